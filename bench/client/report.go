package main

import (
	"fmt"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// metric is one row of the report.
type metric struct {
	key, label string
	better     string // "lower", "higher" or "" (a count to read as is)
}

// metrics are the report's rows, in order.
var metrics = []metric{
	{"rps", "POST 1 KiB, req/s (wrk -c50)", "higher"},
	{"p50", "POST p50 latency, ms", "lower"},
	{"p99", "POST p99 latency, ms", "lower"},
	{"cpu_req", "proxy CPU per request, µs (utime+stime)", "lower"},
	{"ttfe_p50", "SSE time to first event p50, µs", "lower"},
	{"ttfe_p99", "SSE time to first event p99, µs", "lower"},
	{"sse_1by1", "SSE streams whose event 1 arrived before event 2 was sent (of %[1]d)", ""},
	{"sse_e2_lag", "SSE event 2 send→receive p50, µs", "lower"},
	{"tput", "256 MiB response, MiB/s", "higher"},
	{"startup", "exec → first 200, ms (¹)", "lower"},
	{"rss_idle", "RSS idle, MiB", "lower"},
	{"pss_idle", "PSS idle, MiB", "lower"},
	{"rss_load", "RSS after POST load, MiB", "lower"},
	{"streams_ok", "slow SSE streams open at once (of %[2]d)", ""},
	{"rss_streams", "RSS holding the streams, MiB", "lower"},
	{"pss_streams", "PSS holding the streams, MiB", "lower"},
	{"kib_stream", "RSS per open stream, KiB", "lower"},
	{"rss_peak", "peak RSS (VmHWM) over the visit, MiB", "lower"},
	{"close_p50", "client gone → upstream cancelled p50, ms (²)", "lower"},
	{"close_max", "client gone → upstream cancelled max, ms (²)", "lower"},
}

func median(v []float64) float64 {
	var s []float64
	for _, x := range v {
		if !math.IsNaN(x) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// spread is half the range of v relative to its median, in percent.
func spread(v []float64) float64 {
	if len(v) < 2 || slices.ContainsFunc(v, func(x float64) bool { return math.IsInf(x, 0) }) {
		return math.NaN()
	}
	m := median(v)
	if m == 0 {
		return 0
	}
	return (slices.Max(v) - slices.Min(v)) / 2 / math.Abs(m) * 100
}

func num(v float64) string {
	switch a := math.Abs(v); {
	case math.IsNaN(v):
		return "–"
	case math.IsInf(v, 1):
		return "> 3000"
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// label is m's row label with the run's counts filled in.
func (b *bench) label(m metric) string {
	if !strings.Contains(m.label, "%[") {
		return m.label
	}
	return fmt.Sprintf(m.label, b.o.oneByOne, b.o.streams)
}

func (b *bench) med(key, peer string) float64 { return median(b.results[key][peer]) }

// report renders the Markdown report: the medians with spreads and ratios,
// the targets, the per-round values, and the notes.
func (b *bench) report() string {
	var w strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&w, "# oauth-proxy load comparison\n\n")
	fmt.Fprintf(&w, "%s, %s, %d CPUs, %s/%s; %d rounds, peer order rotated each round; wrk -t%d -c%d, %v measured after %v warm-up.\n",
		time.Now().UTC().Format(time.RFC3339), host, runtime.NumCPU(), runtime.GOOS, runtime.GOARCH,
		b.o.rounds, b.o.threads, b.o.conns, b.o.duration, b.o.warmup)
	fmt.Fprintf(&w, "Load average (1/5/15 min) at the start of each round and at the end: %s.\n\n", strings.Join(b.loads, " → "))
	fmt.Fprintf(&w, "Each cell: median over the rounds, ±half the range in %% of it, and (×ratio) = peer ÷ %s.\n\n", b.o.reference)

	fmt.Fprintf(&w, "| figure |")
	for _, p := range b.peers {
		fmt.Fprintf(&w, " %s |", p.name)
	}
	fmt.Fprintf(&w, "\n|---|")
	for range b.peers {
		fmt.Fprintf(&w, "---:|")
	}
	fmt.Fprintln(&w)
	for _, m := range metrics {
		if _, ok := b.results[m.key]; !ok {
			continue
		}
		fmt.Fprintf(&w, "| %s |", b.label(m))
		ref := b.med(m.key, b.o.reference)
		for _, p := range b.peers {
			v := b.results[m.key][p.name]
			med := median(v)
			cell := num(med)
			if m.better == "" && !math.IsNaN(med) {
				cell = strconv.FormatFloat(med, 'f', 0, 64) // a count
			}
			if s := spread(v); !math.IsNaN(s) && !math.IsNaN(med) && m.better != "" {
				cell += fmt.Sprintf(" ±%.0f%%", s)
			}
			if r := med / ref; p.name != b.o.reference && m.better != "" && ref != 0 && !math.IsNaN(r) && !math.IsInf(r, 0) {
				cell += fmt.Sprintf(" (%.2f×)", med/ref)
			}
			fmt.Fprintf(&w, " %s |", cell)
		}
		fmt.Fprintln(&w)
	}
	fmt.Fprintf(&w, "\n(¹) oauth-proxy: its own `GET /health`; the other peers have no /health of their own, so theirs is the first 200 on a proxied path (`/health` of the upstream), which also includes their first upstream connection.\n")
	fmt.Fprintf(&w, "(²) the upstream stream is silent after its first event; \"> 3000\" means the peer had not closed it 3 s after its client left (it notices only when the upstream next sends something), and that peer is then tried once per round only.\n")
	fmt.Fprintf(&w, "CPU is utime+stime from /proc/PID/stat (10 ms ticks) summed over the peer's processes (nginx: master and workers) during the measured wrk run, divided by the requests wrk completed. Memory is VmRSS (and PSS, which counts pages shared between nginx's processes once) summed over the same processes.\n\n")

	b.writeTargets(&w)

	fmt.Fprintf(&w, "\n## Every round\n\n| figure | peer | rounds |\n|---|---|---|\n")
	for _, m := range metrics {
		for _, p := range b.peers {
			v := b.results[m.key][p.name]
			if len(v) == 0 {
				continue
			}
			s := make([]string, len(v))
			for i, x := range v {
				s[i] = num(x)
			}
			fmt.Fprintf(&w, "| %s | %s | %s |\n", b.label(m), p.name, strings.Join(s, " / "))
		}
	}
	if len(b.notes) > 0 {
		fmt.Fprintf(&w, "\n## Notes\n\n")
		for _, n := range b.notes {
			fmt.Fprintf(&w, "- %s\n", n)
		}
	}
	return w.String()
}

// writeTargets checks the figures against the goals the proxy is tuned for.
func (b *bench) writeTargets(w *strings.Builder) {
	ref := b.o.reference
	op := func(k string) float64 { return b.med(k, ref) }
	peer := func(k, p string) float64 { return b.med(k, p) }
	type target struct {
		goal string
		got  string
		ok   bool
	}
	ratio := func(a, c float64) (float64, bool) {
		if math.IsNaN(a) || math.IsNaN(c) || c == 0 {
			return math.NaN(), false
		}
		return a / c, true
	}
	var ts []target
	if r, ok := ratio(op("cpu_req"), peer("cpu_req", "nginx")); ok {
		ts = append(ts, target{"proxy CPU per request ≤ 3× nginx", fmt.Sprintf("%.2f×", r), r <= 3})
	}
	if r, ok := ratio(op("rps"), peer("rps", "nginx")); ok {
		ts = append(ts, target{"req/s ≥ 0.6× nginx", fmt.Sprintf("%.2f×", r), r >= 0.6})
	}
	if r, ok := ratio(op("rps"), peer("rps", "caddy")); ok {
		ts = append(ts, target{"req/s ≥ 1.5× Caddy", fmt.Sprintf("%.2f×", r), r >= 1.5})
	}
	if r, ok := ratio(op("p99"), peer("p99", "nginx")); ok {
		ts = append(ts, target{"p99 ≤ 1.5× nginx", fmt.Sprintf("%.2f×", r), r <= 1.5})
	}
	if v := b.results["sse_1by1"][ref]; len(v) > 0 {
		all := slices.Min(v) == float64(b.o.oneByOne)
		ts = append(ts, target{"SSE events arrive one by one", fmt.Sprintf("%.0f of %d (worst round)", slices.Min(v), b.o.oneByOne), all})
	}
	if a, d := op("ttfe_p99"), peer("ttfe_p99", "direct"); !math.IsNaN(a) && !math.IsNaN(d) {
		ts = append(ts, target{"SSE TTFE p99 within 1 ms of direct", fmt.Sprintf("+%.0f µs", a-d), a-d <= 1000})
	}
	if r, ok := ratio(op("tput"), peer("tput", "direct")); ok {
		ts = append(ts, target{"256 MiB throughput ≥ 0.9× direct", fmt.Sprintf("%.2f×", r), r >= 0.9})
	}
	if v := op("rss_streams"); !math.IsNaN(v) {
		ts = append(ts, target{fmt.Sprintf("RSS with %d SSE streams ≤ 32 MiB", b.o.streams), num(v) + " MiB", v <= 32})
	}
	if v := op("rss_idle"); !math.IsNaN(v) {
		ts = append(ts, target{"RSS idle ≤ 8 MiB", num(v) + " MiB", v <= 8})
	}
	if v := op("startup"); !math.IsNaN(v) {
		ts = append(ts, target{"exec → first /health 200 ≤ 5 ms", num(v) + " ms", v <= 5})
	}
	if len(ts) == 0 {
		return
	}
	fmt.Fprintf(w, "## Targets (%s, medians)\n\n| target | figure | met |\n|---|---:|---|\n", ref)
	for _, t := range ts {
		mark := "no"
		if t.ok {
			mark = "yes"
		}
		fmt.Fprintf(w, "| %s | %s | %s |\n", t.goal, t.got, mark)
	}
}
