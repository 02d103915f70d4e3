package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testTuning keeps SPEC.md's numbers except those a test would wait for.
var testTuning = tuning{
	connectTimeout: 2 * time.Second,
	tlsTimeout:     2 * time.Second,
	attempts:       3,
	retryPause:     100 * time.Millisecond,
	drainTimeout:   2 * time.Second,
	headerTimeout:  10 * time.Second,
	bodyBudget:     64 << 20,
}

// testConfig is a valid config in front of upstream with the default
// anthropic-beta append rule and a short timeout.
func testConfig(t testing.TB, upstream string) *Config {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	return &Config{
		Path:           "test.toml",
		ListenAddr:     "127.0.0.1:0",
		Upstream:       u,
		Timeout:        2 * time.Second,
		MaxConnections: 64,
		MaxBodyBytes:   10 << 20,
		Headers:        []HeaderRule{{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend, Line: 7}},
	}
}

// testProxy is the real handler stack behind a real listener on 127.0.0.1.
type testProxy struct {
	url  string // http://127.0.0.1:port
	addr string
	srv  *server
	ln   *listener
	logs *logBuffer
}

// startProxy serves cfg on 127.0.0.1. When the test ends it checks that
// every line logged was a JSON object.
func startProxy(t testing.TB, cfg *Config, tun tuning) *testProxy {
	t.Helper()
	logs := newLogBuffer()
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s := newServer(cfg, log, tun)
	hs := s.httpServer()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := s.listen(ln).(*listener)
	go hs.Serve(l)
	t.Cleanup(func() {
		hs.Close()
		s.transport.CloseIdleConnections()
		logs.checkJSON(t)
	})
	return &testProxy{url: "http://" + ln.Addr().String(), addr: ln.Addr().String(), srv: s, ln: l, logs: logs}
}

// testClient returns an HTTP client that neither decompresses nor shares
// connections with other tests. An exchange still unfinished after 30 s
// fails its test rather than stalling the whole run.
func testClient(t testing.TB) *http.Client {
	tr := &http.Transport{DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// logBuffer collects JSON log lines and lets tests wait for them.
type logBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	written chan struct{} // signalled after every write
}

func newLogBuffer() *logBuffer { return &logBuffer{written: make(chan struct{}, 1)} }

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	n, err := b.buf.Write(p)
	b.mu.Unlock()
	select {
	case b.written <- struct{}{}:
	default:
	}
	return n, err
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// lines decodes every line; a line that is not a JSON object fails t.
func (b *logBuffer) lines(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Errorf("log line is not a JSON object: %q: %v", sc.Text(), err)
			continue
		}
		out = append(out, m)
	}
	return out
}

func (b *logBuffer) checkJSON(t testing.TB) { b.lines(t) }

// requests returns the "request" log lines.
func (b *logBuffer) requests(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range b.lines(t) {
		if l["msg"] == "request" {
			out = append(out, l)
		}
	}
	return out
}

// waitRequests waits until n request lines were logged and returns them.
// Request lines are written when the handler returns, which can be just
// after the client has seen the end of the response.
func (b *logBuffer) waitRequests(t testing.TB, n int) []map[string]any {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		if got := b.requests(t); len(got) >= n {
			if len(got) > n {
				t.Errorf("got %d request log lines, want %d:\n%s", len(got), n, b.String())
			}
			return got
		}
		select {
		case <-b.written:
		case <-deadline:
			t.Fatalf("timed out waiting for %d request log lines; log:\n%s", n, b.String())
		}
	}
}

// errorBody is the JSON error shape of SPEC.md, the API's envelope.
type errorBody struct {
	Type  string `json:"type"`
	Error struct {
		Type      string `json:"type"`
		Message   string `json:"message"`
		RequestID string `json:"request_id"`
	} `json:"error"`
}

// readError checks that res is a proxy error with the given status and
// returns its decoded body.
func readError(t testing.TB, res *http.Response, status int) errorBody {
	t.Helper()
	defer res.Body.Close()
	if res.StatusCode != status {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("status = %d; want %d (body %q)", res.StatusCode, status, b)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q; want application/json", ct)
	}
	var e errorBody
	dec := json.NewDecoder(res.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("error body does not decode: %v", err)
	}
	if e.Type != "error" {
		t.Errorf("type = %q; want error (the API's envelope)", e.Type)
	}
	if want := proxyErrorType(status); e.Error.Type != want {
		t.Errorf("error.type = %q; want %s", e.Error.Type, want)
	}
	if !isRequestID(e.Error.RequestID) {
		t.Errorf("error.request_id = %q; want req_ and 32 lowercase hex digits", e.Error.RequestID)
	}
	if got := res.Header.Get("Request-Id"); got != e.Error.RequestID {
		t.Errorf("request-id header = %q; want the body's request_id %q", got, e.Error.RequestID)
	}
	return e
}

// proxyErrorType is the error.type SPEC.md gives a proxy error with status.
func proxyErrorType(status int) string {
	if status == http.StatusRequestEntityTooLarge {
		return "request_too_large"
	}
	return "proxy_error"
}

func isRequestID(s string) bool {
	if len(s) != 36 || !strings.HasPrefix(s, "req_") {
		return false
	}
	for _, c := range s[4:] {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// rawRequest sends req verbatim over a new TCP connection and returns the
// response as read by net/http.
func rawRequest(t testing.TB, addr, req string) *http.Response {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading response to %q: %v", req, err)
	}
	return res
}

// metricsText scrapes /metrics.
func metricsText(t testing.TB, p *testProxy) string {
	t.Helper()
	res, err := testClient(t).Get(p.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// metricValue returns the value of the sample line that starts with series
// followed by a space, or "" when absent.
func metricValue(text, series string) string {
	for line := range strings.Lines(text) {
		if v, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), series+" "); ok {
			return v
		}
	}
	return ""
}

// waitGauge waits until the gauge g reads want: how a test knows that
// requests have reached a queue.
func waitGauge(t testing.TB, g *atomic.Int64, want int64) {
	t.Helper()
	if !pollGauge(g, func(v int64) bool { return v == want }) {
		t.Fatalf("gauge reads %d after 5s; want %d", g.Load(), want)
	}
}

// pollGauge reports whether the gauge g satisfies ok within 5 s.
func pollGauge(g *atomic.Int64, ok func(int64) bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if ok(g.Load()) {
			return true
		}
	}
	return false
}
