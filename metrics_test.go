package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

// update rewrites the golden files under testdata instead of comparing
// against them: go test -run TestMetricsGolden -update.
var update = flag.Bool("update", false, "rewrite testdata golden files")

// goldenObservations fills m with the fixed traffic behind
// testdata/metrics.golden: several statuses including the proxy's own
// 400/502/504 and 499 for a client that left, several methods including
// non-standard ones counted as OTHER, durations exactly on bucket bounds (le
// is inclusive) and beyond the last bound (60 s).
func goldenObservations(m *metrics) {
	m.observe("POST", 200, 5*time.Millisecond)        // exactly on the first bound
	m.observe("POST", 200, 5*time.Millisecond+1)      // just above it
	m.observe("POST", 200, 120*time.Millisecond)      // inside (0.1, 0.25]
	m.observe("POST", 200, 90*time.Minute)            // a long stream: +Inf only
	m.observe("GET", 200, time.Millisecond)           // below the first bound
	m.observe("HEAD", 200, 0)                         // zero duration
	m.observe("BREW", 200, time.Second)               // non-standard: OTHER; on the 1 s bound
	m.observe("get", 404, 2500*time.Millisecond)      // lower case is not GET: OTHER; on the 2.5 s bound
	m.observe("DELETE", 400, 50*time.Millisecond)     // body too large, on the 0.05 bound
	m.observe("POST", 499, 30*time.Second)            // the client left, on the 30 s bound
	m.observe("POST", 502, 60*time.Second)            // connection failure, on the last bound
	m.observe("POST", 504, 3*time.Minute+time.Second) // three attempts timed out: +Inf
	m.observe("OPTIONS", 204, 10*time.Millisecond)    // on the 0.01 bound
	m.observe("PUT", 201, 11*time.Second)             // inside (10, 30]
	m.observe("PATCH", 201, 500*time.Millisecond)     // on the 0.5 bound
	m.upstreamError(errTypeInvalidRequest)
	m.upstreamError(errTypeConnection)
	m.upstreamError(errTypeTimeout)
	m.upstreamError(errTypeTimeout)
	m.streamError(errTypeTimeout)
	m.upstreamError(errTypeOverloaded)
	m.refuse(refuseOverloaded)
	m.refuse(refuseTooManyHeaders)
	m.refuse(refuseTooManyHeaders)
	m.inFlight.Store(3)
	m.waiting[waitSlot].Store(2)
	m.bodyBudget.Store(1 << 20)
	m.clientConns.Store(7)

	// Plan usage: a Claude Max organization whose 5-hour window went from
	// allowed to allowed_warning, and whose weekly one is overdrawn; an
	// API-key organization with per-resource limits; a malformed value.
	for _, kv := range [][]string{
		{"Anthropic-Organization-Id", "4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10",
			"Anthropic-Ratelimit-Unified-Status", "allowed",
			"Anthropic-Ratelimit-Unified-Representative-Claim", "seven_day",
			"Anthropic-Ratelimit-Unified-5h-Utilization", "0.5"},
		{"Anthropic-Organization-Id", "4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10",
			"Anthropic-Ratelimit-Unified-Status", "allowed_warning",
			"Anthropic-Ratelimit-Unified-Representative-Claim", "five_hour",
			"Anthropic-Ratelimit-Unified-5h-Utilization", "0.92",
			"Anthropic-Ratelimit-Unified-5h-Reset", "1764500400",
			"Anthropic-Ratelimit-Unified-7d-Utilization", "1.05",
			"Anthropic-Ratelimit-Unified-7d-Reset", "1764900000",
			"Anthropic-Ratelimit-Unified-7d_opus-Utilization", "NaN"},
		{"Anthropic-Organization-Id", "0a8f",
			"Anthropic-Ratelimit-Requests-Limit", "50",
			"Anthropic-Ratelimit-Requests-Remaining", "49",
			"Anthropic-Ratelimit-Input-Tokens-Limit", "30000",
			"Anthropic-Ratelimit-Input-Tokens-Remaining", "29000"},
	} {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		m.plan.rateLimits(h)
	}
	all := [numTokenTypes]bool{true, true, true, true}
	m.plan.addTokens("4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10", "claude-sonnet-4-5-20250929", [numTokenTypes]int64{25, 15, 100, 0}, all)
	m.plan.addTokens("4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10", "claude-sonnet-4-5-20250929", [numTokenTypes]int64{5, 1, 0, 2000}, all)
	m.plan.addTokens("", "claude-haiku-4-5", [numTokenTypes]int64{7, 3}, [numTokenTypes]bool{true, true})
	m.plan.skipped[skipEncoding].Add(1)
}

// newFixedMetrics returns new metrics whose process gauges do not change
// between scrapes: a start time of 2025-11-30T00:00:00.25Z, 48 MiB
// resident, a memory limit of 110 MiB. TestProcessMetrics checks the real
// ones.
func newFixedMetrics() *metrics {
	m := newMetrics()
	m.process = processMetrics{
		start:    time.Date(2025, 11, 30, 0, 0, 0, 250e6, time.UTC),
		rss:      func() (int64, bool) { return 48 << 20, true },
		memLimit: func() int64 { return 110 << 20 },
	}
	return m
}

// TestProcessMetrics reads the real process gauges: the resident memory
// /proc reports (where there is a /proc), the start time, the memory limit.
func TestProcessMetrics(t *testing.T) {
	before := time.Now()
	m := newMetrics()
	var b bytes.Buffer
	m.writePrometheus(&b)
	text := b.String()
	start, err := strconv.ParseFloat(metricValue(text, "process_start_time_seconds"), 64)
	if err != nil || start < float64(before.Unix()) || start > float64(time.Now().Unix()+1) {
		t.Errorf("process_start_time_seconds %q; want about %d", metricValue(text, "process_start_time_seconds"), before.Unix())
	}
	if got, want := metricValue(text, "go_gc_gomemlimit_bytes"), strconv.FormatInt(debug.SetMemoryLimit(-1), 10); got != want {
		t.Errorf("go_gc_gomemlimit_bytes %s; want %s", got, want)
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		if got := metricValue(text, "process_resident_memory_bytes"); got != "" {
			t.Errorf("process_resident_memory_bytes %s without /proc", got)
		}
		return
	}
	var vmRSS int64 // kB
	for line := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			vmRSS, _ = strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	rss, err := strconv.ParseInt(metricValue(text, "process_resident_memory_bytes"), 10, 64)
	if err != nil || vmRSS == 0 || rss < vmRSS<<10/2 || rss > vmRSS<<10*2 {
		t.Errorf("process_resident_memory_bytes %d; /proc/self/status has VmRSS %d kB", rss, vmRSS)
	}
}

func TestMetricsGolden(t *testing.T) {
	m := newFixedMetrics()
	goldenObservations(m)
	var b bytes.Buffer
	m.writePrometheus(&b)
	got := b.Bytes()

	if _, err := parseExposition(string(got)); err != nil {
		t.Errorf("output does not pass the exposition checker: %v\n%s", err, got)
	}

	golden := filepath.Join("testdata", "metrics.golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -run TestMetricsGolden -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("writePrometheus differs from %s (-want +got):\n%s", golden, cmp.Diff(string(want), string(got)))
	}
}

func TestMetricsStartup(t *testing.T) {
	var b bytes.Buffer
	newFixedMetrics().writePrometheus(&b)
	fams, err := parseExposition(b.String())
	if err != nil {
		t.Fatalf("startup output does not pass the exposition checker: %v\n%s", err, b.String())
	}
	type fam struct{ Name, Type, Samples string }
	var got []fam
	for _, f := range fams {
		got = append(got, fam{f.name, f.typ, f.samplesText()})
	}
	var refused strings.Builder
	for _, r := range refusalLabels {
		refused.WriteString(`proxy_refused_total{reason="` + r + `"} 0` + "\n")
	}
	want := []fam{
		{"anthropic_ratelimit_limit", "gauge", ""},
		{"anthropic_ratelimit_remaining", "gauge", ""},
		{"anthropic_ratelimit_unified_representative_claim", "gauge", ""},
		{"anthropic_ratelimit_unified_reset_timestamp_seconds", "gauge", ""},
		{"anthropic_ratelimit_unified_status", "gauge", ""},
		{"anthropic_ratelimit_unified_utilization", "gauge", ""},
		{"anthropic_tokens_total", "counter", ""},
		{"anthropic_usage_parse_errors_total", "counter", "anthropic_usage_parse_errors_total 0\n"},
		{"anthropic_usage_skipped_total", "counter", `anthropic_usage_skipped_total{reason="encoding"} 0` + "\n"},
		{"go_gc_gomemlimit_bytes", "gauge", "go_gc_gomemlimit_bytes 115343360\n"},
		{"process_resident_memory_bytes", "gauge", "process_resident_memory_bytes 50331648\n"},
		{"process_start_time_seconds", "gauge", "process_start_time_seconds 1764460800.25\n"},
		{"proxy_body_budget_bytes_in_use", "gauge", "proxy_body_budget_bytes_in_use 0\n"},
		{"proxy_client_connections", "gauge", "proxy_client_connections 0\n"},
		{"proxy_refused_total", "counter", refused.String()},
		{"proxy_request_duration_seconds", "histogram", ""},
		{"proxy_requests_in_flight", "gauge", "proxy_requests_in_flight 0\n"},
		{"proxy_requests_total", "counter", ""},
		{"proxy_requests_waiting", "gauge", "" +
			`proxy_requests_waiting{for="body_budget"} 0` + "\n" +
			`proxy_requests_waiting{for="slot"} 0` + "\n"},
		{"proxy_stream_errors_total", "counter", "" +
			`proxy_stream_errors_total{error_type="connection"} 0` + "\n" +
			`proxy_stream_errors_total{error_type="timeout"} 0` + "\n"},
		{"proxy_upstream_errors_total", "counter", "" +
			`proxy_upstream_errors_total{error_type="connection"} 0` + "\n" +
			`proxy_upstream_errors_total{error_type="invalid_request"} 0` + "\n" +
			`proxy_upstream_errors_total{error_type="overloaded"} 0` + "\n" +
			`proxy_upstream_errors_total{error_type="timeout"} 0` + "\n"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("families at startup (-want +got):\n%s", diff)
	}
	for _, f := range fams {
		if f.help == "" {
			t.Errorf("family %s has an empty HELP", f.name)
		}
	}
	if m := newFixedMetrics(); m.requestsServed() != 0 || m.errorsTotal() != 0 {
		t.Errorf("new metrics: requestsServed() = %d, errorsTotal() = %d; want 0, 0", m.requestsServed(), m.errorsTotal())
	}
}

func TestMethodIndex(t *testing.T) {
	tests := []struct {
		name, method, want string
	}{
		{"connect", "CONNECT", "CONNECT"},
		{"delete", "DELETE", "DELETE"},
		{"get", "GET", "GET"},
		{"head", "HEAD", "HEAD"},
		{"options", "OPTIONS", "OPTIONS"},
		{"patch", "PATCH", "PATCH"},
		{"post", "POST", "POST"},
		{"put", "PUT", "PUT"},
		{"trace", "TRACE", "TRACE"},
		{"lower case", "get", "OTHER"},
		{"mixed case", "Post", "OTHER"},
		{"webdav", "PROPFIND", "OTHER"},
		{"invented", "BREW", "OTHER"},
		{"the label itself", "OTHER", "OTHER"},
		{"empty", "", "OTHER"},
		{"trailing space", "GET ", "OTHER"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := methodLabels[methodIndex(tt.method)]; got != tt.want {
				t.Errorf("methodLabels[methodIndex(%q)] = %q; want %q", tt.method, got, tt.want)
			}
		})
	}
	if !slices.IsSorted(methodLabels[:]) {
		t.Errorf("methodLabels = %q; want sorted", methodLabels)
	}
}

func TestBucketIndex(t *testing.T) {
	tests := []struct {
		name string
		d    time.Duration
		want string // the le label of the bucket
	}{
		{"zero", 0, "0.005"},
		{"on the first bound", 5 * time.Millisecond, "0.005"},
		{"just above the first bound", 5*time.Millisecond + 1, "0.01"},
		{"on 2.5 s", 2500 * time.Millisecond, "2.5"},
		{"on the last bound", 60 * time.Second, "60"},
		{"just above the last bound", 60*time.Second + 1, "+Inf"},
		{"hours", 5 * time.Hour, "+Inf"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := "+Inf"
			if i := bucketIndex(tt.d); i < len(durationBounds) {
				got = strconv.FormatFloat(durationBounds[i].Seconds(), 'g', -1, 64)
			}
			if got != tt.want {
				t.Errorf("bucketIndex(%v) is the bucket le=%q; want le=%q", tt.d, got, tt.want)
			}
		})
	}
}

// TestMetricsStatusClamp checks that codes net/http never sends are kept,
// as 999, and that a negative duration counts as 0.
func TestMetricsStatusClamp(t *testing.T) {
	m := newFixedMetrics()
	m.observe("GET", 0, -time.Second)
	m.observe("GET", 99, 0)
	m.observe("GET", 1000, 0)
	m.observe("GET", -200, 0)
	var b bytes.Buffer
	m.writePrometheus(&b)
	fams, err := parseExposition(b.String())
	if err != nil {
		t.Fatalf("parseExposition: %v\n%s", err, b.String())
	}
	byName := map[string]int{}
	for i, f := range fams {
		byName[f.name] = i
	}
	requests, durations := fams[byName[requestsName]], fams[byName[durationName]]
	want := `proxy_requests_total{status="999",method="GET"} 4` + "\n"
	if got := requests.samplesText(); got != want {
		t.Errorf("proxy_requests_total samples = %q; want %q", got, want)
	}
	if v, _ := durations.value("proxy_request_duration_seconds_sum", "status", "999"); v != 0 {
		t.Errorf("proxy_request_duration_seconds_sum{status=\"999\"} = %v; want 0", v)
	}
	if v, _ := durations.value("proxy_request_duration_seconds_bucket", "status", "999", "le", "0.005"); v != 4 {
		t.Errorf("proxy_request_duration_seconds_bucket{status=\"999\",le=\"0.005\"} = %v; want 4", v)
	}
}

func TestWriteEscaped(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		help, lbl string // want in HELP text, want in a label value
	}{
		{"plain", "timeout", "timeout", "timeout"},
		{"empty", "", "", ""},
		{"backslash", `a\b`, `a\\b`, `a\\b`},
		{"newline", "a\nb", `a\nb`, `a\nb`},
		{"quote", `say "hi"`, `say "hi"`, `say \"hi\"`},
		{"all", "\\\"\n", `\\"\n`, `\\\"\n`},
		{"tab and utf-8 kept", "a\tb é", "a\tb é", "a\tb é"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			writeEscaped(&b, tt.in, false)
			if got := b.String(); got != tt.help {
				t.Errorf("writeEscaped(%q, false) wrote %q; want %q", tt.in, got, tt.help)
			}
			b.Reset()
			writeEscaped(&b, tt.in, true)
			if got := b.String(); got != tt.lbl {
				t.Errorf("writeEscaped(%q, true) wrote %q; want %q", tt.in, got, tt.lbl)
			}
			// What the checker unescapes must be the input again.
			if got, err := unescape(tt.lbl, true); err != nil || got != tt.in {
				t.Errorf("unescape(%q, true) = %q, %v; want %q, nil", tt.lbl, got, err, tt.in)
			}
		})
	}
}

func TestMetricsServeHTTP(t *testing.T) {
	m := newFixedMetrics()
	goldenObservations(m)
	srv := httptest.NewServer(m)
	t.Cleanup(srv.Close)
	var want bytes.Buffer
	m.writePrometheus(&want)

	for _, method := range []string{http.MethodGet, http.MethodHead} {
		t.Run(method, func(t *testing.T) {
			req, err := http.NewRequestWithContext(t.Context(), method, srv.URL+"/metrics", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s /metrics status = %d; want 200", method, resp.StatusCode)
			}
			if got := resp.Header.Get("Content-Type"); got != "text/plain; version=0.0.4; charset=utf-8" {
				t.Errorf("%s /metrics Content-Type = %q; want %q", method, got, "text/plain; version=0.0.4; charset=utf-8")
			}
			if got, want := resp.Header.Get("Content-Length"), strconv.Itoa(want.Len()); got != want {
				t.Errorf("%s /metrics Content-Length = %q; want %q", method, got, want)
			}
			wantBody := want.String()
			if method == http.MethodHead {
				wantBody = ""
			}
			if diff := cmp.Diff(wantBody, string(body)); diff != "" {
				t.Errorf("%s /metrics body (-want +got):\n%s", method, diff)
			}
		})
	}
}

// TestMetricsConcurrent observes from many goroutines while scraping: every
// scrape must pass the checker (a histogram's +Inf bucket equals its count
// even mid-update), totals never go down, and the final output equals that
// of the same observations made one by one.
func TestMetricsConcurrent(t *testing.T) {
	const (
		workers = 16    // goroutines observing at once
		perG    = 20000 // observations per goroutine
	)
	statuses := []int{200, 200, 200, 201, 400, 404, 499, 502, 504}
	methods := []string{"POST", "POST", "GET", "HEAD", "BREW"}
	durs := []time.Duration{time.Millisecond, 5 * time.Millisecond, 300 * time.Millisecond, 60 * time.Second, time.Hour}
	work := func(m *metrics, g int) {
		for i := range perG {
			m.observe(methods[(g+i)%len(methods)], statuses[(g*7+i)%len(statuses)], durs[i%len(durs)])
			if i%10 == 0 {
				m.upstreamError(errorType((g + i) % numErrorTypes))
			}
		}
	}

	m := newFixedMetrics()
	var wg sync.WaitGroup
	started := make(chan struct{}) // closed after the first scrape, so scrapes overlap the updates
	done := make(chan struct{})
	scrapes := make(chan int)
	go func() {
		n := 0
		defer func() { scrapes <- n }()
		defer func() {
			if n == 0 {
				close(started)
			}
		}()
		var b bytes.Buffer
		var lastServed, lastErrors uint64
		for {
			b.Reset()
			m.writePrometheus(&b)
			if _, err := parseExposition(b.String()); err != nil {
				t.Errorf("scrape %d during updates: %v", n, err)
				return
			}
			served, errs := m.requestsServed(), m.errorsTotal()
			if served < lastServed || errs < lastErrors {
				t.Errorf("scrape %d: requestsServed, errorsTotal went from %d, %d to %d, %d", n, lastServed, lastErrors, served, errs)
			}
			lastServed, lastErrors = served, errs
			if n++; n == 1 {
				close(started)
			}
			select {
			case <-done:
				return
			default:
			}
		}
	}()
	<-started
	for g := range workers {
		wg.Go(func() { work(m, g) })
	}
	wg.Wait()
	close(done)
	t.Logf("%d scrapes while updating", <-scrapes)

	if got, want := m.requestsServed(), uint64(workers*perG); got != want {
		t.Errorf("requestsServed() = %d; want %d", got, want)
	}
	if got, want := m.errorsTotal(), uint64(workers*perG/10); got != want {
		t.Errorf("errorsTotal() = %d; want %d", got, want)
	}
	seq := newFixedMetrics()
	for g := range workers {
		work(seq, g)
	}
	var got, want bytes.Buffer
	m.writePrometheus(&got)
	seq.writePrometheus(&want)
	if diff := cmp.Diff(want.String(), got.String()); diff != "" {
		t.Errorf("concurrent observations differ from sequential ones (-want +got):\n%s", diff)
	}
}

func TestMetricsAllocs(t *testing.T) {
	m := newFixedMetrics()
	tests := []struct {
		name string
		f    func()
	}{
		{"observe", func() { m.observe("POST", 200, 120*time.Millisecond) }},
		{"observe OTHER", func() { m.observe("PROPFIND", 207, 2*time.Hour) }},
		{"observe out of range", func() { m.observe("", 0, -1) }},
		{"upstreamError", func() { m.upstreamError(errTypeTimeout) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if n := testing.AllocsPerRun(1000, tt.f); n != 0 {
				t.Errorf("%s: %v allocations per call; want 0", tt.name, n)
			}
		})
	}
	t.Run("writePrometheus", func(t *testing.T) {
		goldenObservations(m)
		var b bytes.Buffer
		m.writePrometheus(&b) // grow the buffer once
		n := testing.AllocsPerRun(100, func() {
			b.Reset()
			m.writePrometheus(&b)
		})
		if n != 0 {
			t.Errorf("writePrometheus into a grown buffer: %v allocations per call; want 0", n)
		}
	})
}

// TestMetricsSize keeps the fixed arrays within their memory budget.
func TestMetricsSize(t *testing.T) {
	const budget = 300 << 10 // 300 KiB
	if size := unsafe.Sizeof(metrics{}); size > budget {
		t.Errorf("unsafe.Sizeof(metrics{}) = %d bytes; want at most %d", size, budget)
	}
}

func BenchmarkMetricsObserve(b *testing.B) {
	m := newFixedMetrics()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		// Every goroutine hits the same series, the common case (POST 200)
		// and the worst one for cache-line contention.
		for pb.Next() {
			m.observe("POST", 200, 420*time.Millisecond)
		}
	})
}

func BenchmarkMetricsWrite(b *testing.B) {
	m := newFixedMetrics()
	// 100 statuses × 10 methods: 1,000 proxy_requests_total series and 100
	// histograms (1,600 more lines).
	for s := 200; s < 300; s++ {
		for i, method := range methodLabels {
			m.observe(method, s, time.Duration(i)*time.Second)
		}
	}
	var buf bytes.Buffer
	m.writePrometheus(&buf)
	b.SetBytes(int64(buf.Len()))
	b.ReportAllocs()
	for b.Loop() {
		buf.Reset()
		m.writePrometheus(&buf)
	}
}

// The rest of this file is a strict checker of the text exposition format
// 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/), so
// the tests need no Prometheus dependency. It accepts the grammar's subset
// this package writes and checks the invariants Prometheus relies on.

// expFamily is one parsed metric family.
type expFamily struct {
	name, help, typ string
	samples         []expSample
}

// expSample is one parsed sample line.
type expSample struct {
	name   string
	labels []expLabel
	value  float64
	line   string
}

// expLabel is one label pair of a sample.
type expLabel struct{ name, value string }

// samplesText returns the sample lines of f, each with its newline.
func (f expFamily) samplesText() string {
	var s strings.Builder
	for _, x := range f.samples {
		s.WriteString(x.line + "\n")
	}
	return s.String()
}

// value returns the value of the sample of f named name with exactly the
// label pairs given as name, value, name, value...
func (f expFamily) value(name string, labels ...string) (float64, bool) {
	for _, x := range f.samples {
		if x.name != name || len(x.labels)*2 != len(labels) {
			continue
		}
		match := true
		for i, l := range x.labels {
			match = match && l.name == labels[2*i] && l.value == labels[2*i+1]
		}
		if match {
			return x.value, true
		}
	}
	return 0, false
}

// parseExposition parses text strictly and checks:
//   - it ends with a newline and has no blank lines or other comments;
//   - each family starts with # HELP (valid escapes) then # TYPE, once,
//     before its samples; its samples follow contiguously; families are
//     sorted by name;
//   - metric and label names, quoted label values and their escapes, and
//     values follow the grammar; no timestamps, no duplicate label names;
//   - sample names belong to their family (name_bucket, _sum, _count for a
//     histogram; le only on _bucket, as the last label);
//   - every sample of a family has the same label names in the same order,
//     and series are strictly increasing by label values (no duplicates);
//   - counters are non-negative; each histogram series is _bucket lines with
//     increasing le ending at +Inf, cumulative counts that never decrease,
//     then _sum, then _count equal to the +Inf bucket.
func parseExposition(text string) ([]expFamily, error) {
	if !strings.HasSuffix(text, "\n") {
		return nil, errors.New("output does not end with a newline")
	}
	var fams []expFamily
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		n++ // line numbers start at 1
		switch {
		case line == "":
			return nil, fmt.Errorf("line %d: blank line", n)
		case strings.HasPrefix(line, "# HELP "):
			name, help, ok := strings.Cut(strings.TrimPrefix(line, "# HELP "), " ")
			if !ok || !validMetricName(name) {
				return nil, fmt.Errorf("line %d: malformed HELP line %q", n, line)
			}
			h, err := unescape(help, false)
			if err != nil {
				return nil, fmt.Errorf("line %d: HELP text: %v", n, err)
			}
			for _, f := range fams {
				if f.name == name {
					return nil, fmt.Errorf("line %d: second HELP for %s", n, name)
				}
			}
			if len(fams) > 0 && fams[len(fams)-1].name >= name {
				return nil, fmt.Errorf("line %d: family %s after %s: families not sorted", n, name, fams[len(fams)-1].name)
			}
			fams = append(fams, expFamily{name: name, help: h})
		case strings.HasPrefix(line, "# TYPE "):
			name, typ, ok := strings.Cut(strings.TrimPrefix(line, "# TYPE "), " ")
			if !ok || !validMetricName(name) {
				return nil, fmt.Errorf("line %d: malformed TYPE line %q", n, line)
			}
			if !slices.Contains([]string{"counter", "gauge", "histogram", "summary", "untyped"}, typ) {
				return nil, fmt.Errorf("line %d: unknown type %q", n, typ)
			}
			if len(fams) == 0 || fams[len(fams)-1].name != name {
				return nil, fmt.Errorf("line %d: TYPE for %s not right after its HELP", n, name)
			}
			f := &fams[len(fams)-1]
			if f.typ != "" {
				return nil, fmt.Errorf("line %d: second TYPE for %s", n, name)
			}
			if len(f.samples) > 0 {
				return nil, fmt.Errorf("line %d: TYPE for %s after its samples", n, name)
			}
			f.typ = typ
		case strings.HasPrefix(line, "#"):
			return nil, fmt.Errorf("line %d: unexpected comment %q", n, line)
		default:
			s, err := parseSample(line)
			if err != nil {
				return nil, fmt.Errorf("line %d: %v", n, err)
			}
			if len(fams) == 0 || fams[len(fams)-1].typ == "" {
				return nil, fmt.Errorf("line %d: sample %s before any HELP and TYPE", n, s.name)
			}
			f := &fams[len(fams)-1]
			if err := f.checkName(s); err != nil {
				return nil, fmt.Errorf("line %d: %v", n, err)
			}
			f.samples = append(f.samples, s)
		}
	}
	for _, f := range fams {
		if err := f.check(); err != nil {
			return nil, fmt.Errorf("family %s: %v", f.name, err)
		}
	}
	return fams, nil
}

// checkName checks that s belongs to f and carries le exactly where needed.
func (f *expFamily) checkName(s expSample) error {
	hasLE := len(s.labels) > 0 && s.labels[len(s.labels)-1].name == "le"
	for _, l := range s.labels[:max(len(s.labels)-1, 0)] {
		if l.name == "le" {
			return fmt.Errorf("sample %s: le is not the last label", s.name)
		}
	}
	switch {
	case f.typ == "histogram" && s.name == f.name+"_bucket":
		if !hasLE {
			return fmt.Errorf("sample %s without le", s.name)
		}
		return nil
	case f.typ == "histogram" && (s.name == f.name+"_sum" || s.name == f.name+"_count"),
		f.typ != "histogram" && s.name == f.name:
		if hasLE {
			return fmt.Errorf("sample %s with le", s.name)
		}
		return nil
	}
	return fmt.Errorf("sample %s does not belong to %s family %s", s.name, f.typ, f.name)
}

// check checks the label order, sorting and value rules of a complete family.
func (f *expFamily) check() error {
	var names []string // label names (without le) of the first sample
	prevKey, prevIsSet := "", false
	for i, s := range f.samples {
		var ln []string
		var key strings.Builder
		for _, l := range s.labels {
			if l.name != "le" {
				ln = append(ln, l.name)
				key.WriteString(l.value + "\x00") // a value sorts before its extensions
			}
		}
		if i == 0 {
			names = ln
		} else if !slices.Equal(names, ln) {
			return fmt.Errorf("%s: label names %q differ from %q", s.line, ln, names)
		}
		k := key.String()
		// A histogram series spans several lines with one key; a new key
		// starts at its first _bucket line.
		newSeries := f.typ != "histogram" || (s.name == f.name+"_bucket" && (i == 0 || f.samples[i-1].name != s.name))
		if newSeries {
			if prevIsSet && k <= prevKey {
				return fmt.Errorf("%s: series not sorted or repeated", s.line)
			}
			prevKey, prevIsSet = k, true
		} else if k != prevKey {
			return fmt.Errorf("%s: outside its histogram series", s.line)
		}
		if f.typ == "counter" && !(s.value >= 0) {
			return fmt.Errorf("%s: counter value is not a non-negative number", s.line)
		}
	}
	if f.typ == "histogram" {
		return f.checkHistogram()
	}
	return nil
}

// checkHistogram checks each series of a histogram family: buckets, _sum, _count.
func (f *expFamily) checkHistogram() error {
	ss := f.samples
	for len(ss) > 0 {
		prevLE, prevCount := math.Inf(-1), 0.0
		i := 0
		for ; i < len(ss) && ss[i].name == f.name+"_bucket"; i++ {
			le, err := strconv.ParseFloat(ss[i].labels[len(ss[i].labels)-1].value, 64)
			if err != nil {
				return fmt.Errorf("%s: le: %v", ss[i].line, err)
			}
			if le <= prevLE {
				return fmt.Errorf("%s: le not increasing", ss[i].line)
			}
			if !(ss[i].value >= prevCount) || ss[i].value != math.Trunc(ss[i].value) {
				return fmt.Errorf("%s: bucket count not cumulative", ss[i].line)
			}
			prevLE, prevCount = le, ss[i].value
		}
		switch {
		case i == 0:
			return fmt.Errorf("%s: series does not start with _bucket", ss[0].line)
		case !math.IsInf(prevLE, 1):
			return fmt.Errorf("%s: last bucket is not le=\"+Inf\"", ss[i-1].line)
		case i+1 >= len(ss) || ss[i].name != f.name+"_sum" || ss[i+1].name != f.name+"_count":
			return fmt.Errorf("%s: buckets not followed by _sum and _count", ss[i-1].line)
		case !(ss[i].value >= 0):
			return fmt.Errorf("%s: negative or NaN _sum", ss[i].line)
		case ss[i+1].value != prevCount:
			return fmt.Errorf("%s: _count differs from the +Inf bucket %v", ss[i+1].line, prevCount)
		}
		ss = ss[i+2:]
	}
	return nil
}

// parseSample parses one sample line: name, optional {labels}, one space, value.
func parseSample(line string) (expSample, error) {
	s := expSample{line: line}
	end := strings.IndexAny(line, "{ ")
	if end < 0 {
		return s, fmt.Errorf("sample %q has no value", line)
	}
	s.name, line = line[:end], line[end:]
	if !validMetricName(s.name) {
		return s, fmt.Errorf("invalid metric name %q", s.name)
	}
	if strings.HasPrefix(line, "{") {
		line = line[1:]
		for {
			name, rest, ok := strings.Cut(line, `="`)
			if !ok || !validLabelName(name) {
				return s, fmt.Errorf("%s: malformed label at %q", s.line, line)
			}
			for _, l := range s.labels {
				if l.name == name {
					return s, fmt.Errorf("%s: label %s repeated", s.line, name)
				}
			}
			// The value ends at the first quote not escaped by a backslash.
			j := 0
			for ; j < len(rest) && rest[j] != '"'; j++ {
				if rest[j] == '\\' {
					j++
				}
			}
			if j >= len(rest) {
				return s, fmt.Errorf("%s: unterminated label value", s.line)
			}
			v, err := unescape(rest[:j], true)
			if err != nil {
				return s, fmt.Errorf("%s: label %s: %v", s.line, name, err)
			}
			s.labels = append(s.labels, expLabel{name, v})
			line = rest[j+1:]
			if strings.HasPrefix(line, ",") && !strings.HasPrefix(line, ",}") {
				line = line[1:]
				continue
			}
			if !strings.HasPrefix(line, "}") {
				return s, fmt.Errorf("%s: expected , or } after label %s", s.line, name)
			}
			line = line[1:]
			break
		}
	}
	val, ok := strings.CutPrefix(line, " ")
	if !ok || val == "" || strings.ContainsAny(val, " \t") {
		return s, fmt.Errorf("%s: want one space then the value and no timestamp", s.line)
	}
	v, err := strconv.ParseFloat(val, 64)
	if err != nil {
		return s, fmt.Errorf("%s: value: %v", s.line, err)
	}
	s.value = v
	return s, nil
}

// unescape undoes the text format's escapes: \\ and \n, and \" in label
// values (quote true). A raw newline, a raw quote in a label value or any
// other backslash sequence is an error.
func unescape(s string, quote bool) (string, error) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\n':
			return "", errors.New("raw newline")
		case c == '"' && quote:
			return "", errors.New("unescaped quote")
		case c != '\\':
			b.WriteByte(c)
		case i+1 == len(s):
			return "", errors.New("trailing backslash")
		default:
			i++
			switch s[i] {
			case '\\':
				b.WriteByte('\\')
			case 'n':
				b.WriteByte('\n')
			case '"':
				if !quote {
					return "", errors.New(`\" in HELP text`)
				}
				b.WriteByte('"')
			default:
				return "", fmt.Errorf("invalid escape \\%c", s[i])
			}
		}
	}
	return b.String(), nil
}

// validMetricName reports whether s matches [a-zA-Z_:][a-zA-Z0-9_:]*.
func validMetricName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c == '_' || c == ':' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || i > 0 && '0' <= c && c <= '9') {
			return false
		}
	}
	return s != ""
}

// validLabelName reports whether s matches [a-zA-Z_][a-zA-Z0-9_]*.
func validLabelName(s string) bool {
	return validMetricName(s) && !strings.Contains(s, ":")
}

// TestParseExposition shows that the checker rejects what it claims to.
func TestParseExposition(t *testing.T) {
	const (
		hc = "# HELP c_total C.\n# TYPE c_total counter\n"
		hh = "# HELP h H.\n# TYPE h histogram\n"
	)
	good := hc + `c_total{a="x",b="1"} 1` + "\n" + `c_total{a="x",b="2"} 0` + "\n" +
		hh + `h_bucket{a="x",le="1"} 1` + "\n" + `h_bucket{a="x",le="+Inf"} 2` + "\n" +
		`h_sum{a="x"} 3.5` + "\n" + `h_count{a="x"} 2` + "\n"
	if _, err := parseExposition(good); err != nil {
		t.Fatalf("parseExposition(good) = %v; want nil", err)
	}
	tests := []struct {
		name, text, wantErr string
	}{
		{"no trailing newline", strings.TrimSuffix(good, "\n"), "does not end with a newline"},
		{"blank line", hc + "\n", "blank line"},
		{"other comment", hc + "# hello\n", "unexpected comment"},
		{"sample before TYPE", "# HELP c_total C.\nc_total 1\n", "before any HELP and TYPE"},
		{"TYPE without HELP", "# TYPE c_total counter\n", "not right after its HELP"},
		{"second TYPE", hc + "# TYPE c_total counter\n", "second TYPE"},
		{"second HELP", hc + "c_total 1\n" + hc, "second HELP"},
		{"families unsorted", hh + hc, "families not sorted"},
		{"foreign sample", hc + "d_total 1\n", "does not belong"},
		{"bad HELP escape", "# HELP c_total a\\tb\n# TYPE c_total counter\n", `invalid escape \t`},
		{"unquoted label", hc + "c_total{a=x} 1\n", "malformed label"},
		{"bad label escape", hc + `c_total{a="\t"} 1` + "\n", `invalid escape \t`},
		{"trailing comma", hc + `c_total{a="x",} 1` + "\n", "expected , or }"},
		{"repeated label", hc + `c_total{a="x",a="y"} 1` + "\n", "label a repeated"},
		{"timestamp", hc + "c_total 1 1700000000000\n", "no timestamp"},
		{"bad value", hc + "c_total one\n", "value"},
		{"negative counter", hc + "c_total -1\n", "non-negative"},
		{"series unsorted", hc + `c_total{a="y"} 1` + "\n" + `c_total{a="x"} 1` + "\n", "not sorted"},
		{"series repeated", hc + `c_total{a="x"} 1` + "\n" + `c_total{a="x"} 1` + "\n", "not sorted or repeated"},
		{"label names differ", hc + `c_total{a="x"} 1` + "\n" + `c_total{b="y"} 1` + "\n", "differ"},
		{"bucket without le", hh + `h_bucket{a="x"} 1` + "\n", "without le"},
		{"le not last", hh + `h_bucket{le="1",a="x"} 1` + "\n", "le is not the last label"},
		{"not cumulative", hh + `h_bucket{le="1"} 2` + "\n" + `h_bucket{le="+Inf"} 1` + "\n" + "h_sum 1\nh_count 1\n", "not cumulative"},
		{"le not increasing", hh + `h_bucket{le="2"} 1` + "\n" + `h_bucket{le="1"} 1` + "\n", "le not increasing"},
		{"no +Inf", hh + `h_bucket{le="1"} 1` + "\nh_sum 1\nh_count 1\n", `not le="+Inf"`},
		{"count differs", hh + `h_bucket{le="+Inf"} 2` + "\nh_sum 1\nh_count 3\n", "differs from the +Inf bucket"},
		{"no _sum", hh + `h_bucket{le="+Inf"} 2` + "\nh_count 2\n", "not followed by _sum and _count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseExposition(tt.text)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseExposition(%q) = %v; want an error containing %q", tt.text, err, tt.wantErr)
			}
		})
	}
}
