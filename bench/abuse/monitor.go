package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// monitor watches one proxy process for the length of a scenario: its
// memory every 100 ms, /health every 250 ms on a fresh connection (as a
// kubelet probe does), and the /metrics gauges every 500 ms.
type monitor struct {
	p      *proxyProc
	killAt int64 // VmRSS at which the harness kills the proxy, to spare the machine
	start  time.Time
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	peakRSS     int64  // highest VmRSS sampled
	hwm         int64  // VmHWM, the kernel's own peak, read last
	killed      string // why the harness killed the proxy, if it did
	probes      int
	healthFails int
	healthErrs  *tally // why probes failed
	healthLat   latencies
	gaugeMax    map[string]float64 // the highest value of each watched gauge
	last        map[string]float64 // the last /metrics sample, every series
	timeline    []string           // one line per /metrics sample, for -v
}

// watchedGauges are the /metrics gauges whose peaks each scenario reports.
var watchedGauges = []string{inFlight, waitingSlot, waitingBudget, budgetInUse, clientConns}

// probeClient is for /health and /metrics: a fresh connection each time.
var probeClient = &http.Client{
	Transport: &http.Transport{DisableKeepAlives: true},
	Timeout:   2 * time.Second,
}

// watch starts watching p, until finish.
func watch(p *proxyProc, killAt int64) *monitor {
	ctx, cancel := context.WithCancel(context.Background())
	m := &monitor{p: p, killAt: killAt, start: time.Now(), cancel: cancel,
		healthErrs: newTally(), gaugeMax: map[string]float64{}}
	m.every(ctx, 100*time.Millisecond, m.sampleMemory)
	m.every(ctx, 250*time.Millisecond, m.probeHealth)
	m.every(ctx, 500*time.Millisecond, m.sampleMetrics)
	return m
}

// every runs f every d until ctx is done.
func (m *monitor) every(ctx context.Context, d time.Duration, f func(context.Context)) {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			f(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// finish stops the samplers and reads VmHWM one last time, while the
// process still lives.
func (m *monitor) finish() {
	m.cancel()
	m.wg.Wait()
	m.sampleMemory(context.Background())
}

func (m *monitor) sampleMemory(context.Context) {
	if !m.p.alive() {
		return
	}
	rss, err1 := procStatus(m.p.pid(), "VmRSS")
	hwm, err2 := procStatus(m.p.pid(), "VmHWM")
	if err1 != nil || err2 != nil {
		return // exited between the check and the read
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.peakRSS = max(m.peakRSS, rss)
	m.hwm = max(m.hwm, hwm)
	if rss >= m.killAt && m.killed == "" {
		// Far past the pod's limit: the verdict is in, and the machine
		// running the harness must survive the rest of the run.
		m.killed = fmt.Sprintf("killed by the harness at VmRSS %.0f MiB (-kill-mib)", mib(rss))
		m.p.cmd.Process.Signal(syscall.SIGKILL)
	}
}

func (m *monitor) probeHealth(ctx context.Context) {
	if !m.p.alive() {
		return
	}
	start := time.Now()
	status, _, err := get(ctx, probeClient, "http://"+m.p.addr+"/health")
	d := time.Since(start)
	if ctx.Err() != nil {
		return // the scenario ended during the probe
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.probes++
	m.healthLat.add(d)
	switch {
	case err != nil:
		m.healthFails++
		m.healthErrs.add("", outcome(err))
	case status != http.StatusOK:
		m.healthFails++
		m.healthErrs.add("", strconv.Itoa(status))
	}
}

func (m *monitor) sampleMetrics(ctx context.Context) {
	if !m.p.alive() {
		return
	}
	series, err := scrape(ctx, m.p.addr)
	if err != nil {
		return // /health counts failures; a scrape is best effort
	}
	rss, _ := procStatus(m.p.pid(), "VmRSS")
	m.mu.Lock()
	defer m.mu.Unlock()
	m.last = series
	for _, g := range watchedGauges {
		m.gaugeMax[g] = max(m.gaugeMax[g], series[g])
	}
	m.timeline = append(m.timeline, fmt.Sprintf("%5.1fs rss %5.1f MiB  conns %4.0f  in_flight %4.0f  wait slot %4.0f budget %3.0f  budget %5.1f MiB",
		time.Since(m.start).Seconds(), mib(rss), series[clientConns],
		series[inFlight], series[waitingSlot], series[waitingBudget], series[budgetInUse]/(1<<20)))
}

// scrape reads the proxy's /metrics into a map from series ("name" or
// "name{labels}") to value.
func scrape(ctx context.Context, addr string) (map[string]float64, error) {
	status, body, err := get(ctx, probeClient, "http://"+addr+"/metrics")
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, fmt.Errorf("/metrics: status %d", status)
	}
	series := map[string]float64{}
	for line := range strings.SplitSeq(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[i+1:], 64); i > 0 && err == nil {
			series[line[:i]] = v
		}
	}
	return series, nil
}

// refusals returns the proxy_refused_total reasons counted so far, e.g.
// "overloaded 12, too_many_headers 100".
func refusals(series map[string]float64) string {
	var parts []string
	for k, v := range series {
		if reason, ok := strings.CutPrefix(k, `proxy_refused_total{reason="`); ok && v > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f", strings.TrimSuffix(reason, `"}`), v))
		}
	}
	return sortedJoin(parts)
}

// get fetches url and returns its status and (up to 1 MiB of) body.
func get(ctx context.Context, c *http.Client, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	res, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	body, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	return res.StatusCode, body, err
}

// waitMetrics polls /metrics every 50 ms until cond holds or timeout
// passes; it returns the last sample and whether cond held.
func waitMetrics(ctx context.Context, addr string, timeout time.Duration, cond func(map[string]float64) bool) (map[string]float64, bool) {
	deadline := time.Now().Add(timeout)
	for {
		series, err := scrape(ctx, addr)
		if err == nil && cond(series) {
			return series, true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return series, false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
