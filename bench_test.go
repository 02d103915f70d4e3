package main

// Benchmarks of the hot paths. Run them with
//
//	go test -run '^$' -bench . -benchmem -count=5 .
//
// and compare figures as ratios within one run, never as absolute numbers
// (the machine is shared). BenchmarkProxyPost and BenchmarkProxySSE100 go
// through real loopback sockets, so their allocs/op include the client's and
// the upstream's: BenchmarkDirectPost is the same exchange without the proxy,
// and the difference is the proxy's share. BenchmarkServeHTTPStatic calls
// the handler directly against an in-memory upstream, so every allocation
// it reports is the proxy's own. /metrics rendering is BenchmarkMetricsWrite
// in metrics_test.go. bench/ compares the built binary with nginx, HAProxy
// and Caddy under load.

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
)

// benchBody is a 1 KiB JSON request body shaped like a small Messages API
// call.
var benchBody = func() []byte {
	const head = `{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"`
	const tail = `"}]}`
	b := make([]byte, 0, 1024)
	b = append(b, head...)
	b = append(b, strings.Repeat("x", 1024-len(head)-len(tail))...)
	return append(b, tail...)
}()

// benchStreamBody is benchBody asking for a streamed response.
var benchStreamBody = bytes.Replace(benchBody, []byte(`"max_tokens":1024,`), []byte(`"max_tokens":1024,"stream":true,`), 1)

// benchReply is the upstream's answer to benchBody, about 400 bytes.
var benchReply = []byte(`{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant",` +
	`"model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello! How can I help you today?"}],` +
	`"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":10,` +
	`"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}` + "\n")

// benchLogger logs like production (JSON, info: one line per request) into
// io.Discard, so the cost of formatting the request line is measured.
func benchLogger(level slog.Level) *slog.Logger {
	return slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: level}))
}

// startBenchProxy serves the real handler stack for cfg on 127.0.0.1. Unlike
// startProxy it keeps no log: a benchmark would pile up millions of lines.
func startBenchProxy(b *testing.B, cfg *Config) string {
	b.Helper()
	s := newServer(cfg, benchLogger(slog.LevelInfo), testTuning)
	hs := s.httpServer()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go hs.Serve(s.listen(ln))
	b.Cleanup(func() {
		hs.Close()
		s.transport.CloseIdleConnections()
	})
	return "http://" + ln.Addr().String()
}

// benchUpstream answers POST with benchReply, a POST asking for a stream
// with a Messages event stream of n text deltas, and GET with n deltas
// alone; each event is flushed on its own.
func benchUpstream(b *testing.B, events int) *httptest.Server {
	b.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body []byte
		if r.Method == http.MethodPost {
			body, _ = io.ReadAll(r.Body)
		}
		if r.Method == http.MethodPost && !bytes.Contains(body, []byte(`"stream":true`)) {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Request-Id", "req_011CTestUpstream")
			w.Header().Set("Content-Length", strconv.Itoa(len(benchReply)))
			w.Write(benchReply)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		rc := http.NewResponseController(w)
		messages := r.Method == http.MethodPost
		if messages {
			io.WriteString(w, benchMessageStart)
			rc.Flush()
		}
		var line []byte
		for i := range events {
			line = append(line[:0], `event: content_block_delta`+"\n"+`data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"token `...)
			line = strconv.AppendInt(line, int64(i), 10)
			line = append(line, `"}}`+"\n\n"...)
			if _, err := w.Write(line); err != nil {
				return
			}
			rc.Flush()
		}
		if messages {
			io.WriteString(w, benchMessageDelta)
			rc.Flush()
			io.WriteString(w, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
		}
	}))
	b.Cleanup(up.Close)
	return up
}

// The first and last events of a streamed Messages response but
// message_stop, as the API sends them.
const (
	benchMessageStart = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\"," +
		"\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null," +
		"\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0," +
		"\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n"
	benchMessageDelta = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"," +
		"\"stop_sequence\":null},\"usage\":{\"output_tokens\":100}}\n\n"
)

// benchClient is a keep-alive client that never decompresses.
func benchClient(b *testing.B) *http.Client {
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 16}
	b.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// postOnce sends benchBody to url and reads the whole reply.
func postOnce(b *testing.B, c *http.Client, url string) {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(benchBody))
	if err != nil {
		b.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	req.Header.Set("Authorization", "Bearer sk-ant-oat01-benchmark")
	res, err := c.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusOK || n != int64(len(benchReply)) {
		b.Fatalf("POST %s: status %d, %d bytes, %v; want 200, %d bytes", url, res.StatusCode, n, err, len(benchReply))
	}
}

// BenchmarkProxyPost is one 1 KiB JSON POST through the whole stack:
// client, proxy listener, handler, transport, upstream on 127.0.0.1. One
// request at a time, so ns/op is the round trip; allocs/op counts all three
// parties (see BenchmarkDirectPost).
func BenchmarkProxyPost(b *testing.B) {
	up := benchUpstream(b, 0)
	url := startBenchProxy(b, testConfig(b, up.URL)) + "/v1/messages"
	c := benchClient(b)
	postOnce(b, c, url) // open the connections outside the timing
	b.SetBytes(int64(len(benchBody)))
	b.ReportAllocs()
	for b.Loop() {
		postOnce(b, c, url)
	}
}

// BenchmarkDirectPost is BenchmarkProxyPost's exchange without the proxy:
// subtract it from BenchmarkProxyPost to get the proxy's own share.
func BenchmarkDirectPost(b *testing.B) {
	up := benchUpstream(b, 0)
	c := benchClient(b)
	url := up.URL + "/v1/messages"
	postOnce(b, c, url)
	b.SetBytes(int64(len(benchBody)))
	b.ReportAllocs()
	for b.Loop() {
		postOnce(b, c, url)
	}
}

// BenchmarkProxySSE100 is one Server-Sent Events stream of 100 events,
// each flushed by the upstream, read to the end by the client.
func BenchmarkProxySSE100(b *testing.B) {
	const events = 100
	up := benchUpstream(b, events)
	url := startBenchProxy(b, testConfig(b, up.URL)) + "/v1/messages/stream"
	c := benchClient(b)
	stream := func() int64 {
		res, err := c.Get(url)
		return readEvents(b, "GET "+url, res, err, events)
	}
	b.SetBytes(stream())
	b.ReportAllocs()
	for b.Loop() {
		stream()
	}
}

// readEvents reads a streamed response to its end and returns its size; it
// fails the benchmark unless the response came with want events.
func readEvents(b *testing.B, what string, res *http.Response, err error, want int64) int64 {
	if err != nil {
		b.Fatal(err)
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	var n, size int64
	for sc.Scan() {
		size += int64(len(sc.Bytes())) + 1
		if bytes.HasPrefix(sc.Bytes(), []byte("data: ")) {
			n++
		}
	}
	if err := sc.Err(); err != nil || n != want {
		b.Fatalf("%s: %d events, %v; want %d", what, n, err, want)
	}
	return size
}

// BenchmarkProxyMessagesSSE100 is one streamed Messages call: a POST
// asking for a stream, answered with message_start, 100 text deltas,
// message_delta and message_stop, read to the end by the client. Unlike
// BenchmarkProxySSE100, the proxy reads its token usage on the way.
func BenchmarkProxyMessagesSSE100(b *testing.B) {
	const events = 100
	up := benchUpstream(b, events)
	url := startBenchProxy(b, testConfig(b, up.URL)) + "/v1/messages"
	c := benchClient(b)
	stream := func() int64 {
		res, err := c.Post(url, "application/json", bytes.NewReader(benchStreamBody))
		return readEvents(b, "POST "+url, res, err, events+3)
	}
	b.SetBytes(stream())
	b.ReportAllocs()
	for b.Loop() {
		stream()
	}
}

// BenchmarkParseConfig parses the shipped example config.
func BenchmarkParseConfig(b *testing.B) {
	const file = "anthropic-oauth-proxy.example.toml"
	data, err := os.ReadFile(file)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := parseConfig(file, data); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		parseConfig(file, data)
	}
}

// BenchmarkRequestID generates one "req_" + 32 hex request ID.
func BenchmarkRequestID(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		newRequestID()
	}
}

// BenchmarkServeHTTPStatic isolates the proxy's own cost: server.ServeHTTP
// called directly with an in-memory ResponseWriter, and an upstream
// RoundTripper that drains the request body and returns a canned response
// without allocating. Every allocation reported is the proxy's (plus
// ReverseProxy's, which the proxy chose). Cases:
//   - sdk: an Anthropic SDK-style POST, no anthropic-beta of its own, so the
//     append rule just adds the value; info logging (production default).
//   - claude-code: the client sends its own list of beta flags, so the
//     append rule merges the lists.
//   - log-warn: sdk with LOG_LEVEL=warn, to price the request log line.
func BenchmarkServeHTTPStatic(b *testing.B) {
	cases := []struct {
		name  string
		level slog.Level
		beta  string
	}{
		{"sdk", slog.LevelInfo, ""},
		{"claude-code", slog.LevelInfo, "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27,token-efficient-tools-2025-02-19"},
		{"log-warn", slog.LevelWarn, ""},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			cfg := testConfig(b, "http://127.0.0.1:9")
			s := newServer(cfg, benchLogger(tc.level), testTuning)
			up := &staticTransport{}
			up.res = http.Response{
				Status:        "200 OK",
				StatusCode:    http.StatusOK,
				Proto:         "HTTP/1.1",
				ProtoMajor:    1,
				ProtoMinor:    1,
				ContentLength: int64(len(benchReply)),
				Header: http.Header{
					"Content-Type":   {"application/json"},
					"Request-Id":     {"req_011CTestUpstream"},
					"Content-Length": {strconv.Itoa(len(benchReply))},
				},
			}
			up.body.data = benchReply
			rt, ok := s.proxy.Transport.(*retryTransport)
			if !ok {
				b.Fatalf("s.proxy.Transport is %T; want *retryTransport", s.proxy.Transport)
			}
			rt.next = up

			req := httptest.NewRequest(http.MethodPost, "/v1/messages", nil)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Anthropic-Version", "2023-06-01")
			req.Header.Set("Authorization", "Bearer sk-ant-oat01-benchmark")
			req.Header.Set("User-Agent", "Anthropic/Python 0.69.0")
			req.Header.Set("Accept", "application/json")
			if tc.beta != "" {
				req.Header.Set("Anthropic-Beta", tc.beta)
			}
			var body rewindBody
			body.data = benchBody
			req.Body = &body
			req.ContentLength = int64(len(benchBody))
			w := &discardWriter{h: make(http.Header)}
			serve := func() {
				body.r.Reset(body.data)
				clear(w.h)
				w.status, w.n = 0, 0
				s.ServeHTTP(w, req)
				if w.status != http.StatusOK || w.n != len(benchReply) {
					b.Fatalf("ServeHTTP: status %d, %d bytes; want 200, %d bytes", w.status, w.n, len(benchReply))
				}
			}
			serve()
			b.ReportAllocs()
			for b.Loop() {
				serve()
			}
		})
	}
}

// staticTransport is an upstream in memory: it drains the request body and
// returns the same response every time. It reuses one Response, so the
// benchmark runs one request at a time.
type staticTransport struct {
	res  http.Response
	body rewindBody
}

func (t *staticTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		io.Copy(io.Discard, req.Body) // as the real transport would send it
		req.Body.Close()
	}
	if err := req.Context().Err(); err != nil {
		return nil, err
	}
	t.body.r.Reset(t.body.data)
	t.res.Body = &t.body
	t.res.Request = req
	return &t.res, nil
}

// rewindBody is a request or response body that can be replayed without
// allocating.
type rewindBody struct {
	data []byte
	r    bytes.Reader
}

func (b *rewindBody) Read(p []byte) (int, error)         { return b.r.Read(p) }
func (b *rewindBody) WriteTo(w io.Writer) (int64, error) { return b.r.WriteTo(w) }
func (b *rewindBody) Close() error                       { return nil }

// discardWriter is a ResponseWriter that keeps only the status and the byte
// count. It can Flush, as net/http's writer can, so ReverseProxy's flushing
// path runs as in production.
type discardWriter struct {
	h      http.Header
	status int
	n      int
}

func (w *discardWriter) Header() http.Header { return w.h }

func (w *discardWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}

func (w *discardWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.n += len(p)
	return len(p), nil
}

func (w *discardWriter) Flush() {}
