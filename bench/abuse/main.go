// Command abuse proves oauth-proxy's promises under abuse (SPEC.md,
// "Limits under abuse") against the real binary, and exits 1 when one is
// broken.
//
//	cd bench && go run ./abuse                      # every scenario, under 2 minutes
//	go run ./abuse -only slow,ghosts -hold 5s -v
//
// It builds the proxy from -src as the Dockerfile does, and runs each
// scenario against a fresh process started as the pod runs it: the default
// config (max_connections 1000, 10 MiB bodies, 60 s timeouts) and
// GOMEMLIMIT=110MiB, in front of an HTTP/2-over-TLS stand-in for the API
// served by the harness itself. While a scenario runs it samples the
// process's VmRSS every 100 ms, probes /health every 250 ms on a fresh
// connection, and scrapes the /metrics gauges every 500 ms; at its end it
// reads VmHWM, the kernel's record of the peak.
//
// A scenario fails when the peak reaches the pod's 128 MiB limit, the
// process dies, a /health probe fails, a ghost request (one whose client
// left while it waited) reaches the upstream, or a scenario's own promise
// breaks (normal requests delayed by slow uploaders, a request over the
// header limits not refused with 431, a stream cut). Everything listens on
// 127.0.0.1; every process it starts is stopped before it exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

func main() { os.Exit(run()) }

// options are the command's flags.
type options struct {
	src      string
	bin      string
	only     string
	hold     time.Duration
	scale    float64
	maxP99   time.Duration
	limitMiB int64
	killMiB  int64
	memLimit string
	keep     bool
	verbose  bool
}

// harness is the state of one run: the proxy binary, the upstream, the
// work directory for configs and logs.
type harness struct {
	opt  options
	bin  string
	work string
	up   *upstream
}

// result is what one scenario measured and concluded.
type result struct {
	name      string
	hwm       int64 // VmHWM, bytes
	peakRSS   int64 // highest VmRSS sampled, bytes
	probes    int
	unhealthy int    // failed /health probes
	health    string // their latency
	statuses  string
	normal    string // normal requests' latency, "-" when none ran
	ghosts    int64  // ghost requests that reached the upstream
	trials    int64  // ghost trials sent
	gauges    string // peaks of the /metrics gauges
	refused   string // proxy_refused_total by reason
	notes     []string
	fails     []string
	timeline  []string
	elapsed   time.Duration
}

func run() int {
	var o options
	flag.StringVar(&o.src, "src", "..", "oauth-proxy source `dir` to build (default: the checkout around bench/)")
	flag.StringVar(&o.bin, "bin", "", "use this oauth-proxy `binary` instead of building one")
	flag.StringVar(&o.only, "only", "", "comma-separated `scenarios` to run (default all): "+scenarioNames())
	flag.DurationVar(&o.hold, "hold", 8*time.Second, "how long each scenario's abuse lasts")
	flag.Float64Var(&o.scale, "scale", 1, "multiply every scenario's client counts by this `factor`")
	flag.DurationVar(&o.maxP99, "max-p99", 500*time.Millisecond, "normal requests' p99 must stay under this while slow uploaders run")
	flag.Int64Var(&o.limitMiB, "limit-mib", 128, "the pod's memory limit: VmHWM must stay under it (`MiB`)")
	flag.Int64Var(&o.killMiB, "kill-mib", 1024, "kill a proxy whose VmRSS reaches this many `MiB`, to spare the machine")
	flag.StringVar(&o.memLimit, "gomemlimit", "110MiB", "the proxy's GOMEMLIMIT, as the pod sets it")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (configs and proxy logs)")
	flag.BoolVar(&o.verbose, "v", false, "print each scenario's /metrics timeline")
	flag.Parse()
	selected, err := pick(o.only)
	if err != nil {
		fmt.Fprintln(os.Stderr, "abuse:", err)
		return 2
	}

	start := time.Now()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	raiseFileLimit()

	h := &harness{opt: o}
	h.work, err = os.MkdirTemp("", "oauth-proxy-abuse-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "abuse:", err)
		return 2
	}
	defer func() {
		if o.keep {
			fmt.Println("kept", h.work)
		} else {
			os.RemoveAll(h.work)
		}
	}()
	h.bin = o.bin
	if h.bin == "" {
		fmt.Printf("building oauth-proxy from %s\n", o.src)
		if h.bin, err = buildProxy(ctx, o.src, h.work); err != nil {
			fmt.Fprintln(os.Stderr, "abuse:", err)
			return 2
		}
	}
	if h.up, err = startUpstream(h.work); err != nil {
		fmt.Fprintln(os.Stderr, "abuse: upstream:", err)
		return 2
	}
	defer h.up.close()

	var results []*result
	for _, sc := range selected {
		if ctx.Err() != nil {
			break
		}
		fmt.Printf("\n== %s: %s\n", sc.name, sc.about)
		r := h.runScenario(ctx, sc)
		r.print(o.verbose)
		results = append(results, r)
	}
	failed := report(results, o.limitMiB)
	fmt.Printf("\ntotal wall time %.1fs\n", time.Since(start).Seconds())
	if failed || ctx.Err() != nil {
		return 1
	}
	return 0
}

// pick returns the scenarios named in a comma-separated list, all when it
// is empty.
func pick(only string) ([]scenario, error) {
	if only == "" {
		return scenarios, nil
	}
	var out []scenario
	for name := range strings.SplitSeq(only, ",") {
		i := slices.IndexFunc(scenarios, func(s scenario) bool { return s.name == strings.TrimSpace(name) })
		if i < 0 {
			return nil, fmt.Errorf("-only: no scenario %q (have %s)", name, scenarioNames())
		}
		out = append(out, scenarios[i])
	}
	return out, nil
}

func scenarioNames() string {
	var names []string
	for _, s := range scenarios {
		names = append(names, s.name)
	}
	return strings.Join(names, ",")
}

// raiseFileLimit lifts RLIMIT_NOFILE to 65536 (the run holds a few
// thousand sockets on each side). Set explicitly, it is inherited by the
// proxy too: Go restores the original soft limit in children only when it
// raised the limit itself.
func raiseFileLimit() {
	lim := syscall.Rlimit{Cur: 65536, Max: 65536}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		return
	}
	// Not root: as far as the hard limit allows.
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		if lim.Cur < 8192 {
			fmt.Fprintf(os.Stderr, "abuse: RLIMIT_NOFILE is %d; scenarios need about 5000 descriptors\n", lim.Cur)
		}
	}
}

// runScenario starts a proxy, runs sc against it while watching it, and
// stops it.
func (h *harness) runScenario(ctx context.Context, sc scenario) *result {
	r := &result{name: sc.name, normal: "-"}
	h.up.reset()
	p, err := startProxy(ctx, h.bin, h.work, sc.name, h.opt.memLimit, h.up)
	if err != nil {
		r.fails = append(r.fails, err.Error())
		return r
	}
	defer p.kill() // whatever happens below; a no-op once stopped
	mon := watch(p, h.opt.killMiB<<20)

	// The hold is the abuse's length; a phased scenario ends on its own
	// and the hold only bounds it. Nothing may take longer than the hold
	// plus a minute.
	start := time.Now()
	hold := h.opt.hold
	if sc.phased {
		hold = 30 * time.Second
	}
	until := start.Add(hold)
	sctx, cancel := context.WithDeadline(ctx, until.Add(time.Minute))
	defer cancel()
	holdCtx, endHold := context.WithDeadline(sctx, until)
	defer endHold()
	st := &stage{
		ctx: sctx, hold: holdCtx, endHold: endHold, until: until, grace: until.Add(5 * time.Second),
		addr: p.addr, d: newDialer(p.addr), up: h.up, maxP99: h.opt.maxP99,
		out: newTally(), lat: &latencies{}, lag: &latencies{},
	}
	scale := func(n int) int { return max(1, int(float64(n)*h.opt.scale+0.5)) }
	sc.run(st, scale)
	r.elapsed = time.Since(start)

	// Once every client has left, the proxy must hold nothing for them:
	// no slot, no waiter, no budget. Only then is the ghost count final.
	settleStart := time.Now()
	m, settled := waitMetrics(ctx, p.addr, 3*time.Second, idle)
	switch d := time.Since(settleStart); {
	case !p.alive():
	case !settled:
		st.note("3 s after every client left, the proxy still held for them: %.0f slots, %.0f waiting for a slot, "+
			"%.0f waiting for budget, %.1f MiB of budget", m[inFlight], m[waitingSlot], m[waitingBudget], m[budgetInUse]/(1<<20))
	case d > time.Second:
		st.note("idle %.1fs after the clients left", d.Seconds())
	}
	r.ghosts, r.trials = h.up.ghosts.Load()-st.forwardedEarly.Load(), st.trials.Load()
	if nb := h.up.noBeta.Load(); nb > 0 {
		st.note("%d requests reached the upstream without anthropic-beta: %s", nb, beta)
	}

	// The verdict's measurements, while the process still lives.
	mon.finish()
	alive := p.alive()
	if ended := p.stop(); ended != "" && alive {
		st.note("shutdown: %s", ended)
	}
	h.collect(r, st, mon, p, alive)
	return r
}

// collect fills r from the stage and the monitor, and decides.
func (h *harness) collect(r *result, st *stage, mon *monitor, p *proxyProc, alive bool) {
	limit := h.opt.limitMiB << 20
	r.hwm, r.peakRSS = mon.hwm, mon.peakRSS
	r.probes, r.unhealthy = mon.probes, mon.healthFails
	r.health = mon.healthLat.String()
	r.statuses = st.out.String()
	if sent := st.lat.count(); sent > 0 {
		r.normal = fmt.Sprintf("%s / %s (%d/%d got 200)", msStr(st.lat.quantile(0.5)), msStr(st.lat.quantile(0.99)),
			st.out.get("normal", "200"), sent)
		st.note("normal 1 KiB POSTs: %s", st.lat)
	}
	var g []string
	for _, name := range watchedGauges {
		v := mon.gaugeMax[name]
		if name == budgetInUse {
			g = append(g, fmt.Sprintf("%s %.1f MiB", name, v/(1<<20)))
		} else {
			g = append(g, fmt.Sprintf("%s %.0f", name, v))
		}
	}
	r.gauges = strings.Join(g, ", ")
	r.refused = refusals(mon.last)
	r.timeline = mon.timeline
	r.notes = append(st.notes, "proxy log lines: "+p.logSummary())

	if r.hwm >= limit {
		r.fails = append(r.fails, fmt.Sprintf("VmHWM %.1f MiB ≥ the pod's %d MiB", mib(r.hwm), h.opt.limitMiB))
	}
	switch {
	case mon.killed != "":
		r.fails = append(r.fails, mon.killed)
	case !alive:
		r.fails = append(r.fails, fmt.Sprintf("the proxy died (%v): %s", p.waitErr, p.logTail()))
	}
	if r.unhealthy > 0 {
		r.fails = append(r.fails, fmt.Sprintf("/health failed %d of %d probes: %s", r.unhealthy, r.probes, mon.healthErrs))
	}
	if r.ghosts > 0 {
		r.fails = append(r.fails, fmt.Sprintf("%d ghost requests reached the upstream", r.ghosts))
	}
	r.fails = append(r.fails, st.fails...)
}

func (r *result) print(verbose bool) {
	fmt.Printf("  took %.1fs; VmHWM %.1f MiB, peak VmRSS sampled %.1f MiB\n", r.elapsed.Seconds(), mib(r.hwm), mib(r.peakRSS))
	fmt.Printf("  /health: %d probes, %d failed; %s\n", r.probes, r.unhealthy, r.health)
	fmt.Printf("  clients got: %s\n", r.statuses)
	fmt.Printf("  gauge peaks: %s\n", r.gauges)
	if r.refused != "" {
		fmt.Printf("  refused: %s\n", r.refused)
	}
	fmt.Printf("  ghosts that reached the upstream: %d (of %d trials)\n", r.ghosts, r.trials)
	for _, n := range r.notes {
		fmt.Printf("  %s\n", n)
	}
	if verbose {
		for _, line := range r.timeline {
			fmt.Printf("    %s\n", line)
		}
	}
	for _, f := range r.fails {
		fmt.Printf("  FAIL: %s\n", f)
	}
}

// report prints the summary table and says whether any scenario failed.
func report(results []*result, limitMiB int64) bool {
	fmt.Printf("\nsummary (pod limit %d MiB)\n", limitMiB)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tVmHWM MiB\thealth fails\tghosts\tnormal p50 / p99\tverdict\tstatuses")
	failed := false
	for _, r := range results {
		verdict := "ok"
		if len(r.fails) > 0 {
			verdict, failed = "FAIL", true
		}
		ghosts := "-"
		if r.trials > 0 || r.ghosts > 0 {
			ghosts = fmt.Sprintf("%d/%d", r.ghosts, r.trials)
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%d/%d\t%s\t%s\t%s\t%s\n", r.name, mib(r.hwm), r.unhealthy, r.probes, ghosts, r.normal, verdict, r.statuses)
	}
	tw.Flush()
	return failed
}
