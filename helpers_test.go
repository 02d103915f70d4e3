package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testTuning keeps SPEC.md's numbers except those a test would wait for.
var testTuning = func() tuning {
	t := defaultTuning
	t.connectTimeout, t.tlsTimeout, t.drainTimeout = 2*time.Second, 2*time.Second, 2*time.Second
	return t
}()

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

// rawExchange sends req verbatim on a new connection and returns every byte
// the proxy sends until it closes the connection. It fails if the
// connection is still open after limit.
func rawExchange(t testing.TB, addr, req string, limit time.Duration) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(limit))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("connection not closed by the proxy within %v (%v); read %q", limit, err, got)
	}
	return string(got)
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

// checkMetrics compares series of the proxy's /metrics with want.
func checkMetrics(t testing.TB, p *testProxy, want map[string]string) {
	t.Helper()
	m := metricsText(t, p)
	for series, v := range want {
		if got := metricValue(m, series); got != v {
			t.Errorf("%s = %q; want %s", series, got, v)
		}
	}
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
	return eventually(time.Millisecond, func() bool { return ok(g.Load()) })
}

// eventually reports whether cond holds within 5 s, checking it every
// interval: how a test waits for a state it can observe but is not told
// of, such as a gauge or the process's goroutine count.
func eventually(every time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(every) // the polling interval
	}
	return true
}

// echoUpstream records the last request it received and answers 200.
type echoUpstream struct {
	*httptest.Server
	mu       sync.Mutex
	last     *http.Request
	lastBody []byte
	hits     atomic.Int64
}

func newEchoUpstream(t testing.TB) *echoUpstream {
	u := &echoUpstream{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.last, u.lastBody = r, body
		u.mu.Unlock()
		u.hits.Add(1)
		w.Header().Set("Request-Id", "req_upstream_1")
		w.Write([]byte("ok"))
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *echoUpstream) request() (*http.Request, []byte) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.last, u.lastBody
}

// send makes one request through the proxy and returns what the upstream
// received.
func send(t *testing.T, p *testProxy, u *echoUpstream, method, path string, header http.Header) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, p.url+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	res, err := testClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("status = %d; want 200", res.StatusCode)
	}
	got, _ := u.request()
	if got == nil {
		t.Fatal("upstream received nothing")
	}
	return got
}

// countingUpstream counts requests and answers each after delay with a
// Messages response; a negative delay never answers.
func countingUpstream(t testing.TB, delay time.Duration) (*httptest.Server, *atomic.Int64) {
	var hits atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.Copy(io.Discard, r.Body)
		wait := time.NewTimer(delay) // the time the upstream takes to generate
		defer wait.Stop()
		if delay < 0 {
			wait.Stop()
		}
		select {
		case <-wait.C:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"type":"message","content":[{"type":"text","text":"done"}]}`)
	}))
	t.Cleanup(up.Close)
	return up, &hits
}

// holdingUpstream reads each request's body, reports its path, and holds
// the request until release is closed, without sending headers: the
// proxy keeps the body's budget meanwhile.
func holdingUpstream(t testing.TB) (up *httptest.Server, entered chan string, release chan struct{}) {
	entered = make(chan string, 64)
	release = make(chan struct{})
	up = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		entered <- r.URL.Path
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	return up, entered, release
}

// bigUpstream answers every request with size bytes, as fast as it can,
// and reports when its handler has returned.
func bigUpstream(t testing.TB, size int) (*httptest.Server, chan struct{}) {
	done := make(chan struct{}, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() { done <- struct{}{} }()
		w.Header().Set("Content-Length", strconv.Itoa(size))
		chunk := bytes.Repeat([]byte("z"), 64<<10)
		for n := 0; n < size; n += len(chunk) {
			if _, err := w.Write(chunk[:min(len(chunk), size-n)]); err != nil {
				return
			}
		}
	}))
	t.Cleanup(up.Close)
	return up, done
}

// stopReading asks for url and reads 1 KiB of the response, then nothing
// more until the test ends.
func stopReading(t testing.TB, url string) {
	t.Helper()
	res, err := testClient(t).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	if _, err := io.ReadFull(res.Body, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
}
