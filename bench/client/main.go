// Command client drives bench/run.sh's comparison. For each round it visits
// every peer (the order rotated by one each round, so no peer always runs
// first or right after the same neighbour): it starts the peer's process,
// measures it, and stops it. At the end it prints, per figure, each peer's
// median over the rounds, its spread, and its ratio to oauth-proxy.
//
// Everything talks to 127.0.0.1 only, and every step is bounded in time.
//
// The peers file has one peer per line:
//
//	name  listen-addr  probe-path  [VAR=value ...] command [args ...]
//
// with "-" as the command for "direct" (the client talks straight to the
// upstream; no process is started and no process figures are taken).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// beta is the header the proxies inject; the direct client sends it itself.
const beta = "oauth-2025-04-20"

// clockTick is USER_HZ, the unit of utime and stime in /proc/PID/stat; it
// is 100 on every Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

type options struct {
	upstream   string
	rounds     int
	duration   time.Duration // measured wrk run
	warmup     time.Duration // wrk run before it, not measured
	conns      int           // wrk connections
	threads    int           // wrk threads
	ttfe       int           // SSE time-to-first-event samples
	oneByOne   int           // SSE one-by-one samples
	gap        time.Duration // between event 1 and event 2
	bigBytes   int64
	streams    int
	closes     int
	workDir    string
	out        string
	reference  string
	startLimit time.Duration
	tests      map[string]bool
}

type peer struct {
	name   string
	addr   string
	probe  string
	env    []string
	argv   []string // nil for direct
	direct bool
}

func main() {
	var o options
	peersFile := flag.String("peers", "", "peers `file` (see the package comment)")
	flag.StringVar(&o.upstream, "upstream", "127.0.0.1:18400", "upstream `address`")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds; each visits every peer once")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured wrk run per peer and round")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured wrk run before it")
	flag.IntVar(&o.conns, "c", 50, "wrk connections")
	flag.IntVar(&o.threads, "t", 2, "wrk threads")
	flag.IntVar(&o.ttfe, "ttfe", 200, "SSE time-to-first-event samples")
	flag.IntVar(&o.oneByOne, "one-by-one", 10, "SSE one-by-one samples")
	flag.DurationVar(&o.gap, "gap", 50*time.Millisecond, "pause between SSE event 1 and event 2")
	flag.Int64Var(&o.bigBytes, "big", 256<<20, "size of the large response in bytes")
	flag.IntVar(&o.streams, "streams", 1000, "concurrent slow SSE streams held open")
	flag.IntVar(&o.closes, "closes", 20, "client-close samples")
	flag.StringVar(&o.workDir, "work", os.TempDir(), "`dir` for peer logs and the wrk script")
	flag.StringVar(&o.out, "out", "", "also write the Markdown report to `file`")
	flag.StringVar(&o.reference, "ref", "oauth-proxy", "the peer the ratios are relative to")
	flag.DurationVar(&o.startLimit, "start-limit", 10*time.Second, "longest wait for a peer's first 200")
	tests := flag.String("tests", "all", "comma-separated `list` of tests to run: post, sse, big, streams, close (start-up and idle memory are always taken)")
	flag.Parse()
	o.tests = map[string]bool{}
	for t := range strings.SplitSeq(*tests, ",") {
		switch t = strings.TrimSpace(t); t {
		case "all":
			for _, name := range []string{"post", "sse", "big", "streams", "close"} {
				o.tests[name] = true
			}
		case "post", "sse", "big", "streams", "close":
			o.tests[t] = true
		default:
			fatal(fmt.Errorf("-tests: unknown test %q (want post, sse, big, streams, close or all)", t))
		}
	}

	peers, err := readPeers(*peersFile)
	if err != nil {
		fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b := &bench{o: o, peers: peers, results: map[string]map[string][]float64{}}
	if err := b.run(ctx); err != nil {
		fatal(err)
	}
	report := b.report()
	fmt.Print(report)
	if o.out != "" {
		if err := os.WriteFile(o.out, []byte(report), 0o644); err != nil {
			fatal(err)
		}
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

func readPeers(path string) ([]peer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var peers []peer
	for n, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if len(f) < 4 {
			return nil, fmt.Errorf("%s:%d: want name, address, probe path and command", path, n+1)
		}
		p := peer{name: f[0], addr: f[1], probe: f[2]}
		rest := f[3:]
		for len(rest) > 0 && strings.Contains(rest[0], "=") {
			p.env = append(p.env, rest[0])
			rest = rest[1:]
		}
		if len(rest) == 1 && rest[0] == "-" {
			p.direct = true
		} else if len(rest) == 0 {
			return nil, fmt.Errorf("%s:%d: no command", path, n+1)
		} else {
			p.argv = rest
		}
		peers = append(peers, p)
	}
	if len(peers) == 0 {
		return nil, fmt.Errorf("%s: no peers", path)
	}
	return peers, nil
}

// bench holds the figures: results[metric][peer] has one value per round.
type bench struct {
	o       options
	peers   []peer
	results map[string]map[string][]float64
	notes   []string
	loads   []string
	mu      sync.Mutex
}

func (b *bench) record(metric, peer string, v float64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := b.results[metric]
	if m == nil {
		m = map[string][]float64{}
		b.results[metric] = m
	}
	m[peer] = append(m[peer], v)
}

func (b *bench) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintln(os.Stderr, "  note:", msg)
	b.notes = append(b.notes, msg)
}

func (b *bench) run(ctx context.Context) error {
	if err := waitHTTP(ctx, "http://"+b.o.upstream+"/health", 5*time.Second); err != nil {
		return fmt.Errorf("upstream %s: %w", b.o.upstream, err)
	}
	if err := b.writeWrkScripts(); err != nil {
		return err
	}
	for r := range b.o.rounds {
		order := slices.Concat(b.peers[r%len(b.peers):], b.peers[:r%len(b.peers)])
		load := loadavg()
		b.loads = append(b.loads, load)
		names := make([]string, len(order))
		for i, p := range order {
			names[i] = p.name
		}
		fmt.Fprintf(os.Stderr, "round %d/%d, load %s, order %s\n", r+1, b.o.rounds, load, strings.Join(names, " "))
		for _, p := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			start := time.Now()
			if err := b.visit(ctx, p, r); err != nil {
				b.note("round %d, %s: %v", r+1, p.name, err)
			}
			fmt.Fprintf(os.Stderr, "  %-14s %.1fs\n", p.name, time.Since(start).Seconds())
		}
	}
	b.loads = append(b.loads, loadavg())
	return nil
}

// visit starts p, takes every figure once, and stops it.
func (b *bench) visit(ctx context.Context, p peer, round int) error {
	var pr *peerProcess
	if !p.direct {
		var err error
		pr, err = b.start(ctx, p)
		if pr != nil {
			defer pr.stop()
		}
		if err != nil {
			return err
		}
		b.record("startup", p.name, ms(pr.startup))
		time.Sleep(500 * time.Millisecond) // let start-up work settle before "idle"
		b.record("rss_idle", p.name, mib(pr.sum("VmRSS")))
		b.record("pss_idle", p.name, mib(pr.pss()))
	}

	// POST load with wrk: req/s, latency and CPU per request.
	if b.o.tests["post"] {
		if err := b.wrk(ctx, p, pr); err != nil {
			b.note("round %d, %s: wrk: %v", round+1, p.name, err)
		}
		if pr != nil {
			b.record("rss_load", p.name, mib(pr.sum("VmRSS")))
		}
	}
	if b.o.tests["sse"] {
		if err := b.ttfe(ctx, p); err != nil {
			b.note("round %d, %s: SSE time to first event: %v", round+1, p.name, err)
		}
		if err := b.oneByOneCheck(ctx, p); err != nil {
			b.note("round %d, %s: SSE one by one: %v", round+1, p.name, err)
		}
	}
	if b.o.tests["big"] {
		if err := b.throughput(ctx, p); err != nil {
			b.note("round %d, %s: large response: %v", round+1, p.name, err)
		}
	}
	if b.o.tests["streams"] {
		if err := b.holdStreams(ctx, p, pr); err != nil {
			b.note("round %d, %s: %d streams: %v", round+1, p.name, b.o.streams, err)
		}
	}
	if b.o.tests["close"] {
		if err := b.closeLatency(ctx, p, round); err != nil {
			b.note("round %d, %s: client close: %v", round+1, p.name, err)
		}
	}
	if pr != nil {
		b.record("rss_peak", p.name, mib(pr.sum("VmHWM")))
	}
	return ctx.Err()
}

// peerProcess is a started peer: its process tree, for CPU and memory.
type peerProcess struct {
	cmd     *exec.Cmd
	done    chan struct{}
	startup time.Duration
}

// start execs p and waits for the first 200 on its probe path, polling with
// a fresh connection every 100 µs. The figure is the time from exec to that
// answer.
func (b *bench) start(ctx context.Context, p peer) (*peerProcess, error) {
	if c, err := net.DialTimeout("tcp", p.addr, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s is already in use; stop whatever listens there", p.addr)
	}
	logf, err := os.Create(filepath.Join(b.o.workDir, p.name+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	pr := &peerProcess{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(pr.done) }()
	req := "GET " + p.probe + " HTTP/1.1\r\nHost: " + p.addr + "\r\nConnection: close\r\n" + betaLine(p) + "\r\n"
	deadline := t0.Add(b.o.startLimit)
	for {
		if probe(p.addr, req) {
			pr.startup = time.Since(t0)
			return pr, nil
		}
		select {
		case <-pr.done:
			return pr, fmt.Errorf("exited before answering 200 on %s (log: %s)", p.probe, logf.Name())
		case <-ctx.Done():
			return pr, ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return pr, fmt.Errorf("no 200 on %s within %v (log: %s)", p.probe, b.o.startLimit, logf.Name())
		}
		time.Sleep(100 * time.Microsecond)
	}
}

func betaLine(p peer) string {
	if p.direct {
		return "Anthropic-Beta: " + beta + "\r\n"
	}
	return ""
}

// probe sends req over a new connection and reports whether the answer's
// status is 200.
func probe(addr, req string) bool {
	c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "HTTP/1.1 200 ")
}

// stop sends SIGTERM to the process group and waits up to 5 s, then kills it.
func (pr *peerProcess) stop() {
	pgid := pr.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-pr.done:
	case <-time.After(5 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-pr.done
	}
	// Workers of a multi-process peer may outlive the master for a moment.
	for range 50 {
		if syscall.Kill(-pgid, 0) != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(-pgid, syscall.SIGKILL)
}

// pids returns the peer's process and all its descendants (nginx: master
// and workers).
func (pr *peerProcess) pids() []int {
	root := pr.cmd.Process.Pid
	children := map[int][]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		f := statFields(pid)
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
	}
	out := []int{root}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i]]...)
	}
	return out
}

// statFields returns /proc/PID/stat's fields after the command name:
// [0] state, [1] ppid, ... [11] utime, [12] stime.
func statFields(pid int) []string {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil
	}
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(data[i+1:]))
}

// cpu returns the user plus system CPU time used so far by the peer's
// processes.
func (pr *peerProcess) cpu() time.Duration {
	var ticks int64
	for _, pid := range pr.pids() {
		f := statFields(pid)
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += u + s
	}
	return time.Duration(ticks) * clockTick
}

// sum adds up a "kB" field of /proc/PID/status (VmRSS, VmHWM) over the
// peer's processes, in bytes.
func (pr *peerProcess) sum(field string) int64 {
	var total int64
	for _, pid := range pr.pids() {
		total += kbField("/proc/"+strconv.Itoa(pid)+"/status", field+":")
	}
	return total
}

// pss is the proportional set size summed over the peer's processes: shared
// pages (nginx's workers share the master's) are counted once in total.
func (pr *peerProcess) pss() int64 {
	var total int64
	for _, pid := range pr.pids() {
		total += kbField("/proc/"+strconv.Itoa(pid)+"/smaps_rollup", "Pss:")
	}
	return total
}

func kbField(path, key string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, key); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

// writeWrkScripts writes the wrk Lua scripts for the 1 KiB POST: one for
// the proxies, one that also sends anthropic-beta, for direct.
func (b *bench) writeWrkScripts() error {
	body := smallBody()
	script := func(extra string) string {
		return "wrk.method = \"POST\"\n" +
			"wrk.body = '" + body + "'\n" +
			"wrk.headers[\"Content-Type\"] = \"application/json\"\n" +
			"wrk.headers[\"Anthropic-Version\"] = \"2023-06-01\"\n" +
			"wrk.headers[\"Authorization\"] = \"Bearer sk-ant-oat01-benchmark\"\n" + extra
	}
	if err := os.WriteFile(filepath.Join(b.o.workDir, "post.lua"), []byte(script("")), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.o.workDir, "post-direct.lua"),
		[]byte(script("wrk.headers[\"Anthropic-Beta\"] = \""+beta+"\"\n")), 0o644)
}

// smallBody is a 1 KiB JSON Messages API request.
func smallBody() string {
	const head = `{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"`
	const tail = `"}]}`
	return head + strings.Repeat("x", 1024-len(head)-len(tail)) + tail
}

// wrk runs the warm-up and then the measured POST load, and records req/s,
// p50, p99 and the peer's CPU time per request.
func (b *bench) wrk(ctx context.Context, p peer, pr *peerProcess) error {
	script := filepath.Join(b.o.workDir, "post.lua")
	if p.direct {
		script = filepath.Join(b.o.workDir, "post-direct.lua")
	}
	url := "http://" + p.addr + "/v1/messages"
	if _, err := runWrk(ctx, b.o, script, url, b.o.warmup); err != nil {
		return err
	}
	var cpu0 time.Duration
	if pr != nil {
		cpu0 = pr.cpu()
	}
	res, err := runWrk(ctx, b.o, script, url, b.o.duration)
	if err != nil {
		return err
	}
	if res.errors > 0 {
		b.note("%s: %d of %d POSTs failed (non-2xx or socket errors)", p.name, res.errors, res.requests)
	}
	b.record("rps", p.name, res.rps)
	b.record("p50", p.name, res.p50)
	b.record("p99", p.name, res.p99)
	if pr != nil && res.requests > 0 {
		b.record("cpu_req", p.name, float64((pr.cpu()-cpu0).Microseconds())/float64(res.requests))
	}
	return nil
}

type wrkResult struct {
	rps      float64
	p50, p99 float64 // ms
	requests int64
	errors   int64
}

func runWrk(ctx context.Context, o options, script, url string, d time.Duration) (wrkResult, error) {
	secs := max(1, int(d.Round(time.Second)/time.Second))
	ctx, cancel := context.WithTimeout(ctx, d+20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "wrk", "-t"+strconv.Itoa(o.threads), "-c"+strconv.Itoa(o.conns),
		"-d"+strconv.Itoa(secs)+"s", "--latency", "-s", script, url)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("%v: %s", err, out)
	}
	return parseWrk(string(out))
}

// parseWrk reads wrk --latency output.
func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	var have int
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "50%":
			r.p50 = wrkDuration(f[1])
			have++
		case len(f) == 2 && f[0] == "99%":
			r.p99 = wrkDuration(f[1])
			have++
		case len(f) >= 3 && f[1] == "requests" && f[2] == "in":
			r.requests, _ = strconv.ParseInt(f[0], 10, 64)
		case len(f) == 2 && f[0] == "Requests/sec:":
			r.rps, _ = strconv.ParseFloat(f[1], 64)
			have++
		case strings.HasPrefix(strings.TrimSpace(line), "Non-2xx or 3xx responses:"):
			n, _ := strconv.ParseInt(f[len(f)-1], 10, 64)
			r.errors += n
		case strings.HasPrefix(strings.TrimSpace(line), "Socket errors:"):
			// Socket errors: connect 0, read 0, write 0, timeout 0
			for i := 2; i+1 < len(f); i += 2 {
				n, _ := strconv.ParseInt(strings.TrimSuffix(f[i+1], ","), 10, 64)
				r.errors += n
			}
		}
	}
	if have < 3 {
		return r, fmt.Errorf("cannot read wrk output:\n%s", out)
	}
	return r, nil
}

// wrkDuration converts "345.00us", "1.23ms", "2.00s" to milliseconds.
func wrkDuration(s string) float64 {
	for _, u := range []struct {
		suffix string
		ms     float64
	}{{"us", 1e-3}, {"ms", 1}, {"m", 60e3}, {"s", 1e3}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f * u.ms
			}
		}
	}
	return math.NaN()
}

// httpClient returns a keep-alive client for p that never decompresses.
func httpClient() (*http.Client, func()) {
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 4}
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}, tr.CloseIdleConnections
}

func sseRequest(ctx context.Context, p peer, query string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+"/v1/sse?"+query, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	if p.direct {
		req.Header.Set("Anthropic-Beta", beta)
	}
	return req, nil
}

// event is one parsed "data:" line of the upstream's SSE stream.
type event struct {
	seq  int
	sent int64 // upstream's send time, Unix ns
	at   int64 // client's receive time, Unix ns
}

// readEvent reads up to and including the next data line.
func readEvent(r *bufio.Reader) (event, error) {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return event{}, err
		}
		if rest, ok := strings.CutPrefix(line, "data: "); ok {
			e := event{at: time.Now().UnixNano()}
			// {"seq":N,"sent":T}
			rest = strings.Trim(strings.TrimSpace(rest), "{}")
			for kv := range strings.SplitSeq(rest, ",") {
				k, v, _ := strings.Cut(kv, ":")
				n, _ := strconv.ParseInt(v, 10, 64)
				switch strings.Trim(k, `"`) {
				case "seq":
					e.seq = int(n)
				case "sent":
					e.sent = n
				}
			}
			return e, nil
		}
	}
}

// ttfe measures the time from sending a request to reading its first SSE
// event, over keep-alive connections, one request at a time.
func (b *bench) ttfe(ctx context.Context, p peer) error {
	c, closeIdle := httpClient()
	defer closeIdle()
	one := func() (time.Duration, error) {
		req, err := sseRequest(ctx, p, "n=1")
		if err != nil {
			return 0, err
		}
		t0 := time.Now()
		res, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		defer res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("status %d", res.StatusCode)
		}
		br := bufio.NewReader(res.Body)
		if _, err := readEvent(br); err != nil {
			return 0, err
		}
		d := time.Since(t0)
		io.Copy(io.Discard, br)
		return d, nil
	}
	if _, err := one(); err != nil { // open the connections first
		return err
	}
	samples := make([]float64, 0, b.o.ttfe)
	for range b.o.ttfe {
		d, err := one()
		if err != nil {
			return err
		}
		samples = append(samples, float64(d.Nanoseconds())/1e3)
	}
	b.record("ttfe_p50", p.name, percentile(samples, 50))
	b.record("ttfe_p99", p.name, percentile(samples, 99))
	return nil
}

// oneByOneCheck asks for two events o.gap apart and checks that event 1
// reached the client before the upstream sent event 2. A proxy that batches
// delivers both together, after event 2 was sent.
func (b *bench) oneByOneCheck(ctx context.Context, p peer) error {
	c, closeIdle := httpClient()
	defer closeIdle()
	ok := 0
	var lag []float64
	for range b.o.oneByOne {
		req, err := sseRequest(ctx, p, "n=2&gap="+b.o.gap.String())
		if err != nil {
			return err
		}
		res, err := c.Do(req)
		if err != nil {
			return err
		}
		br := bufio.NewReader(res.Body)
		e1, err1 := readEvent(br)
		e2, err2 := readEvent(br)
		io.Copy(io.Discard, br)
		res.Body.Close()
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		if e1.at < e2.sent {
			ok++
		}
		lag = append(lag, float64(e2.at-e2.sent)/1e3)
	}
	b.record("sse_1by1", p.name, float64(ok))
	b.record("sse_e2_lag", p.name, percentile(lag, 50))
	return nil
}

// throughput reads one o.bigBytes response and records MiB/s.
func (b *bench) throughput(ctx context.Context, p peer) error {
	c, closeIdle := httpClient()
	defer closeIdle()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		"http://"+p.addr+"/v1/big?bytes="+strconv.FormatInt(b.o.bigBytes, 10), nil)
	if err != nil {
		return err
	}
	if p.direct {
		req.Header.Set("Anthropic-Beta", beta)
	}
	t0 := time.Now()
	res, err := c.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	buf := make([]byte, 256<<10)
	n, err := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{res.Body}, buf)
	d := time.Since(t0)
	if err != nil {
		return err
	}
	if n != b.o.bigBytes {
		return fmt.Errorf("got %d bytes, want %d", n, b.o.bigBytes)
	}
	b.record("tput", p.name, float64(n)/(1<<20)/d.Seconds())
	return nil
}

// holdStreams opens o.streams slow SSE streams (one event a second) on
// their own connections, waits until each has its first event and one more
// second has passed, and records the peer's memory. Then it closes them all
// and waits for the upstream to see every stream gone.
func (b *bench) holdStreams(ctx context.Context, p peer, pr *peerProcess) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	var (
		mu     sync.Mutex
		conns  []net.Conn
		closed bool // set once every connection is closed; later ones close at once
		opened atomic.Int64
		wg     sync.WaitGroup
	)
	defer func() {
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
		b.waitUpstreamIdle(ctx)
	}()
	req := "GET /v1/sse?n=1&hold=1&every=1s HTTP/1.1\r\nHost: " + p.addr + "\r\nAccept: text/event-stream\r\n" + betaLine(p) + "\r\n"
	ready := make(chan struct{}, b.o.streams)
	dials := make(chan struct{}, 64) // at most 64 handshakes at once: nginx's listen backlog is 511
	for range b.o.streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dials <- struct{}{}
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", p.addr)
			if err != nil {
				<-dials
				return
			}
			c.SetDeadline(time.Now().Add(30 * time.Second)) // bounded whatever happens
			mu.Lock()
			conns = append(conns, c)
			if closed {
				c.Close()
			}
			mu.Unlock()
			_, err = io.WriteString(c, req)
			br := bufio.NewReader(c)
			if err == nil {
				_, err = readEvent(br)
			}
			<-dials
			if err != nil {
				return
			}
			opened.Add(1)
			ready <- struct{}{}
			io.Copy(io.Discard, br) // keep reading until closed
		}()
	}
	var err error
	for range b.o.streams {
		select {
		case <-ready:
			continue
		case <-ctx.Done():
			err = fmt.Errorf("only %d streams opened", opened.Load())
		}
		break
	}
	b.record("streams_ok", p.name, float64(opened.Load()))
	if err != nil {
		return err
	}
	time.Sleep(1500 * time.Millisecond) // one more event through every stream
	if pr != nil {
		rss, pss := pr.sum("VmRSS"), pr.pss()
		b.record("rss_streams", p.name, mib(rss))
		b.record("pss_streams", p.name, mib(pss))
		if idle := b.last("rss_idle", p.name); !math.IsNaN(idle) {
			b.record("kib_stream", p.name, (mib(rss)-idle)*1024/float64(b.o.streams))
		}
	}
	return nil
}

func (b *bench) last(metric, peer string) float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	v := b.results[metric][peer]
	if len(v) == 0 {
		return math.NaN()
	}
	return v[len(v)-1]
}

// waitUpstreamIdle waits up to 5 s for the upstream to report no open
// stream, so one test's leftovers never weigh on the next.
func (b *bench) waitUpstreamIdle(ctx context.Context) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		res, err := http.Get("http://" + b.o.upstream + "/stats")
		if err == nil {
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if strings.TrimSpace(string(body)) == "active 0" {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.note("upstream streams still open 5 s after their clients left")
}

// closeLatency opens a stream that goes silent after its first event,
// closes the client connection, and asks the upstream when it saw its
// request context cancelled. Both clocks are this machine's. A peer that
// does not pass the departure on within 3 s (it would notice only when the
// upstream next sends something) is recorded as +Inf after one try; the
// upstream ends such streams by itself after 5 s.
func (b *bench) closeLatency(ctx context.Context, p peer, round int) error {
	var samples []float64
	for i := range b.o.closes {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		id := fmt.Sprintf("%s-%d-%d-%d", p.name, round, i, time.Now().UnixNano())
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return err
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		req := "GET /v1/sse?n=1&hold=1&max=5s&id=" + id + " HTTP/1.1\r\nHost: " + p.addr + "\r\n" + betaLine(p) + "\r\n"
		if _, err := io.WriteString(c, req); err != nil {
			c.Close()
			return err
		}
		if _, err := readEvent(bufio.NewReader(c)); err != nil {
			c.Close()
			return err
		}
		closed := time.Now().UnixNano()
		c.Close()
		res, err := http.Get("http://" + b.o.upstream + "/cancelled?id=" + id)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			b.note("%s: the upstream stream was still open 3 s after its client left", p.name)
			samples = append(samples, math.Inf(1))
			break
		}
		at, _ := strconv.ParseInt(strings.TrimSpace(string(body)), 10, 64)
		samples = append(samples, float64(at-closed)/1e6)
	}
	b.record("close_p50", p.name, percentile(samples, 50))
	b.record("close_max", p.name, slices.Max(samples))
	return nil
}

func waitHTTP(ctx context.Context, url string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		res, err := http.Get(url)
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no 200 on %s within %v", url, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func percentile(v []float64, p float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }
func mib(n int64) float64        { return float64(n) / (1 << 20) }
