package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Fault injection: each test drives the real proxy listener on 127.0.0.1
// against an upstream or a client that misbehaves in one specific way, and
// states the outcome the proxy owes. Faults tested in proxy_test.go:
// an upstream that never answers (TestHeaderTimeoutRetriedThen504), goes
// silent after its headers (TestIdleStreamIsCut), closes mid-body
// (TestStreamCutMidBodyLogsOnce), cannot be reached
// (TestClosedPortIs502, TestTCPConnectTimeoutIs502NotRetried,
// TestTLSHandshakeTimeoutIs502NotRetried, TestUntrustedTLSIs502) or
// answers with an error status (TestUpstreamErrorsNotRetried); a client
// that leaves mid-stream (TestClientDisconnectCancelsUpstream), while
// waiting for a slot (TestClientGoneWhileWaitingForSlotIsNeverSent) or
// during the retry pause (TestRetryPauseEndsWhenClientLeaves), or sends
// Expect: 100-continue (TestExpectContinueAnsweredOnce). Signals during a
// drain are in main_test.go (TestSIGTERMDrainTimeoutCutsStreams,
// TestSecondSignalStopsAtOnce).

// rawUpstream is a TCP server on 127.0.0.1 that hands each connection to
// serve, for upstream behaviour an http.Handler cannot produce (resets,
// garbage, informational responses). serve owns the connection and must
// return once it is closed; the test's cleanup closes every connection.
type rawUpstream struct {
	addr     string
	accepted atomic.Int64 // connections accepted so far
}

func newRawUpstream(t testing.TB, serve func(c *net.TCPConn, br *bufio.Reader)) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return newRawUpstreamOn(t, ln, serve)
}

// newRawUpstreamOn is newRawUpstream on a listener of the caller's.
func newRawUpstreamOn(t testing.TB, ln net.Listener, serve func(c *net.TCPConn, br *bufio.Reader)) *rawUpstream {
	u := &rawUpstream{addr: ln.Addr().String()}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepted.Add(1)
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { serve(c.(*net.TCPConn), bufio.NewReader(c)) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return u
}

// silent is a rawUpstream behaviour: accept, then never read or write
// until the test ends.
func silent(t testing.TB) func(*net.TCPConn, *bufio.Reader) {
	return func(*net.TCPConn, *bufio.Reader) { <-t.Context().Done() }
}

// url is the upstream_url of a rawUpstream.
func (u *rawUpstream) url() string { return "http://" + u.addr }

// consumeRequest reads one request from br, body included, so that closing
// the connection afterwards sends a FIN rather than a reset. It reports
// whether there was a request.
func consumeRequest(br *bufio.Reader) bool {
	req, err := http.ReadRequest(br)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, req.Body)
	return true
}

// waitClosed reads and discards until the peer closes the connection.
func waitClosed(c net.Conn) { io.Copy(io.Discard, c) }

func TestUpstreamDripFeedOutlivesTimeout(t *testing.T) {
	// One SSE event, one byte every 200 ms: 1.8 s in all, more than three
	// times timeout_secs, but never silent for as long as timeout_secs.
	const event = "data: x\n\n"
	finished := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(finished)
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for i := range len(event) {
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
			io.WriteString(w, event[i:i+1])
			w.(http.Flusher).Flush()
		}
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 500 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	res, err := testClient(t).Get(p.url + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	first := make([]byte, 1)
	if _, err := io.ReadFull(res.Body, first); err != nil {
		t.Fatalf("reading the first byte: %v", err)
	}
	select {
	case <-finished:
		t.Error("the first byte reached the client only after the upstream finished: the stream is batched")
	default:
	}
	rest, err := io.ReadAll(res.Body)
	if got := string(first) + string(rest); err != nil || got != event {
		t.Fatalf("client read %q, %v; want the whole event %q", got, err, event)
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["error"] != nil || l["status"] != float64(200) {
		t.Errorf("log line = %v; want status 200 and no error", l)
	}
	checkMetrics(t, p, map[string]string{
		`proxy_stream_errors_total{error_type="timeout"}`:    "0",
		`proxy_stream_errors_total{error_type="connection"}`: "0",
	})
}

func TestUpstreamResetMidBodyClosesClient(t *testing.T) {
	// The upstream sends headers and one chunk, waits until the client has
	// read it, then resets the connection (SO_LINGER 0, then close).
	seen := make(chan struct{})
	up := newRawUpstream(t, func(c *net.TCPConn, br *bufio.Reader) {
		defer c.Close()
		if !consumeRequest(br) {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"9\r\ndata: 1\n\n\r\n")
		select {
		case <-seen:
		case <-time.After(5 * time.Second):
		}
		c.SetLinger(0)
	})
	p := startProxy(t, testConfig(t, up.url()), testTuning)
	res, err := testClient(t).Get(p.url + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	ev := make([]byte, len("data: 1\n\n"))
	if _, err := io.ReadFull(res.Body, ev); err != nil {
		t.Fatalf("reading the first event: %v", err)
	}
	close(seen)
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(res.Body)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("the stream ended cleanly; want the client connection closed mid-body")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the client still waits 5 s after the upstream reset the connection")
	}
	l := p.logs.waitRequests(t, 1)[0]
	if e, _ := l["error"].(string); !strings.HasPrefix(e, "upstream stream failed: ") || !strings.Contains(e, "reset") ||
		l["status"] != float64(200) || l["level"] != "WARN" {
		t.Errorf("log line = %v; want status 200 and the reset as error at WARN", l)
	}
	checkMetrics(t, p, map[string]string{
		`proxy_stream_errors_total{error_type="connection"}`:   "1",
		`proxy_stream_errors_total{error_type="timeout"}`:      "0",
		`proxy_upstream_errors_total{error_type="connection"}`: "0", // the response was the upstream's
	})
}

func TestUpstreamFailureBeforeHeadersIs502NotRetried(t *testing.T) {
	tests := []struct {
		name    string
		serve   func(c *net.TCPConn, br *bufio.Reader)
		wantMsg string // the error message, after "upstream HOST: "
		wantLog string // in the log line's error: the full error
	}{
		{"closes once the request is read", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			c.Close()
		}, "closed the connection before sending response headers", "EOF"},
		{"resets once the request is read", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			c.SetLinger(0)
			c.Close()
		}, "connection reset", "connection reset by peer"},
		{"closes half-way through the headers", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
			c.Close()
		}, "closed the connection before sending response headers", "EOF"},
		{"answers with a text banner", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			io.WriteString(c, "SSH-2.0-OpenSSH_9.6\r\n")
			waitClosed(c)
			c.Close()
		}, "malformed HTTP response", `malformed HTTP response "SSH-2.0-OpenSSH_9.6"`},
		{"answers with binary garbage", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			c.Write([]byte("\x16\x03\x01\x00\x02\x02\x28garbage\xff\r\n\r\n"))
			waitClosed(c)
			c.Close()
		}, "malformed HTTP response", "malformed HTTP response"},
		{"answers with a bad status code", func(c *net.TCPConn, br *bufio.Reader) {
			consumeRequest(br)
			io.WriteString(c, "HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n")
			waitClosed(c)
			c.Close()
		}, "malformed HTTP response", "malformed HTTP status code"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newRawUpstream(t, tt.serve)
			p := startProxy(t, testConfig(t, up.url()), testTuning)
			res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader(`{"n":1}`))
			if err != nil {
				t.Fatal(err)
			}
			e := readError(t, res, http.StatusBadGateway)
			if want := "upstream " + up.addr + ": " + tt.wantMsg; e.Error.Message != want {
				t.Errorf("message = %q; want %q", e.Error.Message, want)
			}
			if n := up.accepted.Load(); n != 1 {
				t.Errorf("upstream accepted %d connections; want 1 (not retried)", n)
			}
			l := p.logs.waitRequests(t, 1)[0]
			if l["attempts"] != float64(1) || l["status"] != float64(502) {
				t.Errorf("log line = %v; want 1 attempt, status 502", l)
			}
			if msg, _ := l["error"].(string); !strings.Contains(msg, tt.wantLog) {
				t.Errorf("log error = %q; want the full error, with %q", msg, tt.wantLog)
			}
			checkMetrics(t, p, map[string]string{
				`proxy_upstream_errors_total{error_type="connection"}`: "1",
				`proxy_upstream_errors_total{error_type="timeout"}`:    "0",
			})
		})
	}
}

func TestUpstreamErrorStatusesPassVerbatim(t *testing.T) {
	for _, status := range []int{529, 500, 429} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			body := `{"type":"error","error":{"type":"e` + strconv.Itoa(status) + `","message":"upstream says no"}}`
			header := http.Header{
				"Content-Type":                           {"application/json"},
				"Retry-After":                            {"7"},
				"X-Should-Retry":                         {"true"},
				"Request-Id":                             {"req_upstream_" + strconv.Itoa(status)},
				"Anthropic-Ratelimit-Requests-Remaining": {"0"},
				"X-Multi":                                {"one", "two"},
			}
			var hits atomic.Int64
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				for k, v := range header {
					w.Header()[k] = v
				}
				w.WriteHeader(status)
				io.WriteString(w, body)
			}))
			t.Cleanup(up.Close)
			p := startProxy(t, testConfig(t, up.URL), testTuning)
			res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader("{}"))
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != status || string(got) != body {
				t.Fatalf("client got %d %q (%v); want %d %q", res.StatusCode, got, err, status, body)
			}
			for k, v := range header {
				if diff := cmp.Diff(v, res.Header[k]); diff != "" {
					t.Errorf("response header %s (-want +got):\n%s", k, diff)
				}
			}
			if n := hits.Load(); n != 1 {
				t.Errorf("upstream saw %d attempts; want 1", n)
			}
			p.logs.waitRequests(t, 1)
			checkMetrics(t, p, map[string]string{
				`proxy_requests_total{status="` + strconv.Itoa(status) + `",method="POST"}`: "1",
				`proxy_upstream_errors_total{error_type="connection"}`:                      "0",
				`proxy_upstream_errors_total{error_type="timeout"}`:                         "0",
			})
			if n := p.srv.metrics.errorsTotal(); n != 0 {
				t.Errorf("errors_total = %d; want 0: the error is the upstream's", n)
			}
		})
	}
}

func TestLargeResponseHeaders(t *testing.T) {
	// The transport reads at most 1 MiB of response headers
	// (MaxResponseHeaderBytes); more is a 502 that says so.
	tests := []struct {
		name   string
		count  int // headers of 8 KiB each
		status int
	}{
		{"512 KiB pass", 64, http.StatusOK},
		{"1.25 MiB is 502", 160, http.StatusBadGateway},
	}
	value := strings.Repeat("v", 8<<10)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hits atomic.Int64
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				hits.Add(1)
				for i := range tt.count {
					w.Header().Set("X-Big-"+strconv.Itoa(i), value)
				}
				io.WriteString(w, "ok")
			}))
			t.Cleanup(up.Close)
			p := startProxy(t, testConfig(t, up.URL), testTuning)
			res, err := testClient(t).Get(p.url + "/v1/models")
			if err != nil {
				t.Fatal(err)
			}
			if hits.Load() != 1 {
				t.Errorf("upstream saw %d attempts; want 1", hits.Load())
			}
			if tt.status != http.StatusOK {
				e := readError(t, res, tt.status)
				if !strings.HasSuffix(e.Error.Message, ": response headers over 1 MiB") {
					t.Errorf("message = %q; want it to say the headers were over 1 MiB", e.Error.Message)
				}
				return
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != tt.status || string(body) != "ok" {
				t.Fatalf("client got %d %q; want 200 ok", res.StatusCode, body)
			}
			for i := range tt.count {
				if got := res.Header.Get("X-Big-" + strconv.Itoa(i)); got != value {
					t.Fatalf("header X-Big-%d is %d bytes; want %d", i, len(got), len(value))
				}
			}
		})
	}
}

func TestUpstream100ContinueNotPassedOn(t *testing.T) {
	// The upstream sends an unsolicited 100 Continue before its answer. The
	// client gets the answer only, or, if it sent Expect: 100-continue
	// itself, the one 100 Continue net/http sent it and then the answer.
	up := newRawUpstream(t, func(c *net.TCPConn, br *bufio.Reader) {
		defer c.Close()
		for consumeRequest(br) {
			io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\n")
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nanswer")
		}
	})
	p := startProxy(t, testConfig(t, up.url()), testTuning)
	tests := []struct {
		name, expect string
		want100      int
	}{
		{"client sent no Expect", "", 0},
		{"client sent Expect", "Expect: 100-continue\r\n", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("tcp", p.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"+tt.expect+"\r\n")
			br := bufio.NewReader(c)
			if tt.want100 > 0 {
				if line, _ := br.ReadString('\n'); line != "HTTP/1.1 100 Continue\r\n" {
					t.Fatalf("first line %q; want the client's 100 Continue", line)
				}
				br.ReadString('\n')
			}
			io.WriteString(c, "{}")
			rest, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("reading the answer: %v (got %q)", err, rest)
			}
			if !strings.HasPrefix(string(rest), "HTTP/1.1 200 OK\r\n") || strings.Count(string(rest), "HTTP/1.1 ") != 1 ||
				!strings.HasSuffix(string(rest), "\r\n\r\nanswer") {
				t.Errorf("client got %q; want exactly the upstream's 200 answer", rest)
			}
		})
	}
}

func TestSlowlorisHeadersClosedAtHeaderTimeout(t *testing.T) {
	u := newEchoUpstream(t)
	tun := testTuning
	tun.headerTimeout = 300 * time.Millisecond
	p := startProxy(t, testConfig(t, u.URL), tun)
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	io.WriteString(c, "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	closed := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c)
		closed <- b
	}()
	// Trickle one header byte every 50 ms; each byte arrives well inside
	// any per-read timeout, so only a deadline on the whole header stops it.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	limit := time.After(5 * time.Second)
	for {
		select {
		case <-tick.C:
			c.Write([]byte("a"))
			continue
		case got := <-closed:
			if elapsed := time.Since(start); elapsed < 250*time.Millisecond {
				t.Errorf("connection closed after %v; want it open until the 300ms header timeout", elapsed)
			}
			if len(got) != 0 {
				t.Errorf("proxy answered %q; want the connection closed without a response", got)
			}
		case <-limit:
			t.Fatal("connection still open 5 s into a header trickle; want it closed after 300ms")
		}
		break
	}
	if n := u.hits.Load(); n != 0 {
		t.Errorf("upstream saw %d requests; want none", n)
	}
	if n := len(p.logs.requests(t)); n != 0 {
		t.Errorf("%d request log lines; want none for a request never read", n)
	}
}

func TestConflictingBodyFraming(t *testing.T) {
	// net/http resolves Content-Length + "Transfer-Encoding: chunked" the
	// RFC 9112 section 6.3 way: the chunked framing wins and Content-Length
	// is dropped; the proxy then forwards the decoded body with its own
	// Content-Length, so the upstream sees exactly what the proxy read.
	// Every other conflict is refused before the proxy sees the request.
	tests := []struct {
		name     string
		req      string
		status   int
		wantBody string // what the upstream receives when status is 200
	}{
		{"content-length larger than the chunked body",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			http.StatusOK, "hello"},
		{"content-length smaller than the chunked body",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			http.StatusOK, "hello"},
		{"chunked terminator smuggled as content-length body",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
			http.StatusOK, ""},
		{"two different content-lengths",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!",
			http.StatusBadRequest, ""},
		{"transfer-encoding other than chunked",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			http.StatusNotImplemented, ""},
		{"two transfer-encoding lines",
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
			http.StatusNotImplemented, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newEchoUpstream(t)
			p := startProxy(t, testConfig(t, u.URL), testTuning)
			res := rawRequest(t, p.addr, tt.req)
			res.Body.Close()
			if res.StatusCode != tt.status {
				t.Fatalf("status = %d; want %d", res.StatusCode, tt.status)
			}
			got, body := u.request()
			if tt.status != http.StatusOK {
				if got != nil {
					t.Errorf("the upstream received %s %s; want it never contacted", got.Method, got.RequestURI)
				}
				return
			}
			if got == nil {
				t.Fatal("the upstream received nothing")
			}
			if string(body) != tt.wantBody || got.ContentLength != int64(len(tt.wantBody)) || got.TransferEncoding != nil {
				t.Errorf("upstream got body %q, Content-Length %d, Transfer-Encoding %q; want %q framed by its length alone",
					body, got.ContentLength, got.TransferEncoding, tt.wantBody)
			}
		})
	}
}

func TestWebSocketUpgradeNotForwarded(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	res := rawRequest(t, p.addr, "GET /v1/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status = %d; want the upstream's 200", res.StatusCode)
	}
	got, _ := u.request()
	for _, h := range []string{"Upgrade", "Connection"} {
		if v, ok := got.Header[h]; ok {
			t.Errorf("upstream received %s: %q", h, v)
		}
	}
}

func TestUpstream101Is502AndClosed(t *testing.T) {
	// An upstream that switches protocols gets no tunnel: the client gets a
	// 502 and the upstream connection is closed at once, not left open.
	tests := []struct {
		name, reqHeaders, resHeaders string
	}{
		{"client asked for websocket", "Connection: Upgrade\r\nUpgrade: websocket\r\n", "Connection: Upgrade\r\nUpgrade: websocket\r\n"},
		{"client asked for nothing", "", "Connection: Upgrade\r\nUpgrade: websocket\r\n"},
		{"101 naming no protocol", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			closed := make(chan struct{})
			up := newRawUpstream(t, func(c *net.TCPConn, br *bufio.Reader) {
				defer c.Close()
				if !consumeRequest(br) {
					return
				}
				io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\n"+tt.resHeaders+"\r\n")
				waitClosed(c)
				close(closed)
			})
			p := startProxy(t, testConfig(t, up.url()), testTuning)
			res := rawRequest(t, p.addr, "GET /v1/ws HTTP/1.1\r\nHost: x\r\n"+tt.reqHeaders+"\r\n")
			if e := readError(t, res, http.StatusBadGateway); !strings.Contains(e.Error.Message, "protocol switch (101) refused") {
				t.Errorf("message = %q; want it to say the 101 was refused", e.Error.Message)
			}
			select {
			case <-closed:
			case <-time.After(2 * time.Second):
				t.Error("the upstream connection is still open 2 s after the 502")
			}
			if l := p.logs.waitRequests(t, 1)[0]; l["status"] != float64(502) {
				t.Errorf("log line = %v; want status 502", l)
			}
		})
	}
}

func TestHTTP10Client(t *testing.T) {
	// An HTTP/1.0 client without Host gets a readable HTTP/1.0 response,
	// then the connection is closed: with a Content-Length, and for a
	// stream, whose end the closed connection marks.
	tests := []struct {
		name   string
		handle func(w http.ResponseWriter)
		body   string
	}{
		{"fixed length", func(w http.ResponseWriter) {
			w.Header().Set("Content-Length", "5")
			io.WriteString(w, "fixed")
		}, "fixed"},
		{"stream", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range 3 {
				io.WriteString(w, "data: "+strconv.Itoa(i)+"\n\n")
				w.(http.Flusher).Flush()
			}
		}, "data: 0\n\ndata: 1\n\ndata: 2\n\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { tt.handle(w) }))
			t.Cleanup(up.Close)
			p := startProxy(t, testConfig(t, up.URL), testTuning)
			raw := rawExchange(t, p.addr, "GET /v1/models HTTP/1.0\r\n\r\n", 5*time.Second)
			res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), &http.Request{Method: "GET"})
			if err != nil {
				t.Fatalf("response %q does not parse: %v", raw, err)
			}
			body, err := io.ReadAll(res.Body)
			if err != nil || res.StatusCode != 200 || res.Proto != "HTTP/1.0" || string(body) != tt.body {
				t.Errorf("got %s %d %q (%v); want HTTP/1.0 200 %q", res.Proto, res.StatusCode, body, err, tt.body)
			}
		})
	}
}

func TestExpectContinueBodyTooLarge(t *testing.T) {
	// A declared body over max_body_bytes is refused before net/http sends
	// 100 Continue, so the client never sends it; the connection is closed
	// after the 413, since the unsent body cannot be skipped.
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	raw := rawExchange(t, p.addr, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"Content-Length: 10485761\r\nExpect: 100-continue\r\n\r\n", 5*time.Second)
	if !strings.HasPrefix(raw, "HTTP/1.1 413 Request Entity Too Large\r\n") || strings.Contains(raw, "100 Continue") {
		t.Fatalf("client got %q; want a 413 and no 100 Continue", raw)
	}
	res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
	if err != nil {
		t.Fatalf("response %q does not parse: %v", raw, err)
	}
	if e := readError(t, res, http.StatusRequestEntityTooLarge); e.Error.Message != "request body exceeds 10485760 bytes" {
		t.Errorf("message = %q", e.Error.Message)
	}
	if n := u.hits.Load(); n != 0 {
		t.Errorf("upstream saw %d requests; want none", n)
	}
	p.logs.waitRequests(t, 1)
	checkMetrics(t, p, map[string]string{`proxy_upstream_errors_total{error_type="invalid_request"}`: "1"})
}

func TestSIGTERMWithFiftyInFlightDrainsAll(t *testing.T) {
	// 50 requests are held by the upstream when SIGTERM arrives; they are
	// released once the proxy refuses new connections, and all finish
	// inside the 5 s drain.
	const n = 50
	var entered atomic.Int64
	all := make(chan struct{})
	release := make(chan struct{})
	releaseOnce := sync.OnceFunc(func() { close(release) })
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if entered.Add(1) == n {
			close(all)
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "finished "+r.URL.Path)
	}))
	t.Cleanup(up.Close)
	t.Cleanup(releaseOnce) // before up.Close, which waits for its handlers
	p := startProcess(t, validConfig(up.URL), 5*time.Second)
	c := testClient(t)
	results := make(chan string, n) // "" for a request that finished as it should
	for i := range n {
		go func() {
			path := "/v1/messages/" + strconv.Itoa(i)
			res, err := c.Post("http://"+p.addr+path, "application/json", strings.NewReader("{}"))
			if err != nil {
				results <- err.Error()
				return
			}
			b, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != 200 || string(b) != "finished "+path {
				results <- path + ": " + strconv.Itoa(res.StatusCode) + " " + string(b)
				return
			}
			results <- ""
		}()
	}
	select {
	case <-all:
	case <-time.After(10 * time.Second):
		t.Fatalf("only %d of %d requests reached the upstream", entered.Load(), n)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitLog(t, p.stderr, "draining")
	if !eventuallyRefused(p.addr) {
		t.Error("new connections were still accepted while draining; want connection refused")
	}
	releaseOnce()
	finished := 0
	deadline := time.After(10 * time.Second)
	for range n {
		select {
		case r := <-results:
			if r != "" {
				t.Errorf("in-flight request: %s", r)
			} else {
				finished++
			}
		case <-deadline:
			t.Fatalf("%d of %d in-flight requests answered within 10 s", finished, n)
		}
	}
	code := p.wait(t, 5*time.Second)
	if code != 0 || finished != n {
		t.Errorf("%d of %d in-flight requests finished, exit %d; want all and exit 0", finished, n, code)
	}
	if !strings.Contains(p.stderr.String(), `"event":"Drained"`) {
		t.Errorf("log does not say Drained:\n%s", p.stderr.String())
	}
	t.Logf("SIGTERM with %d requests in flight: %d finished, exit %d", n, finished, code)
}

// openFDs counts the process's open file descriptors, or returns -1 where
// /proc/self/fd does not exist.
func openFDs(t testing.TB) int {
	t.Helper()
	if runtime.GOOS != "linux" {
		return -1
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// leakRequests is the load of TestNoLeaksUnderMixedFaults: about 2 s, and
// 5 s under the race detector, on two CPUs.
const leakRequests = 10_000

// leakPlan is one request of TestNoLeaksUnderMixedFaults.
type leakPlan struct {
	fault       string        // the upstream's behaviour, sent as X-Fault
	post        bool          // POST with a body, else GET
	cancelAfter time.Duration // the client cancels after this long; 0 = never
}

func TestNoLeaksUnderMixedFaults(t *testing.T) {
	// leakRequests requests, 32 at a time, against an upstream that answers,
	// streams slowly, fails with 500, hangs until cancelled, drops the
	// connection or switches protocols; some clients give up mid-way. After
	// the load, with idle connections closed, the goroutines and file
	// descriptors are back to their baseline and every slot and byte of
	// body budget is free.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		switch r.Header.Get("X-Fault") {
		case "ok":
			io.WriteString(w, "ok")
		case "stream":
			w.Header().Set("Content-Type", "text/event-stream")
			for i := range 3 {
				io.WriteString(w, "data: "+strconv.Itoa(i)+"\n\n")
				w.(http.Flusher).Flush()
				time.Sleep(time.Millisecond)
			}
		case "500":
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, `{"type":"error"}`)
		case "hang":
			<-r.Context().Done()
		case "hijack":
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
		case "switch":
			w.Header().Set("Connection", "Upgrade")
			w.Header().Set("Upgrade", "websocket")
			w.WriteHeader(http.StatusSwitchingProtocols)
		}
	}))
	t.Cleanup(up.Close)
	tun := testTuning
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 60 * time.Second // the default; every hang is ended by its client
	p := startProxy(t, cfg, tun)
	tr := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 32}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr}
	wantStatus := map[string]int{"ok": 200, "stream": 200, "500": 500, "hijack": 502, "switch": 502}
	wantBody := map[string]string{"ok": "ok", "stream": "data: 0\n\ndata: 1\n\ndata: 2\n\n", "500": `{"type":"error"}`}

	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)

	rng := rand.New(rand.NewPCG(20251129, 1))
	faults := []string{"ok", "ok", "ok", "stream", "stream", "500", "hang", "hijack", "switch"}
	plans := make([]leakPlan, leakRequests)
	for i := range plans {
		pl := leakPlan{fault: faults[rng.IntN(len(faults))], post: rng.IntN(2) == 0}
		switch {
		case pl.fault == "hang":
			pl.cancelAfter = time.Millisecond + time.Duration(rng.Int64N(int64(4*time.Millisecond)))
		case rng.IntN(10) == 0:
			pl.cancelAfter = time.Microsecond + time.Duration(rng.Int64N(int64(3*time.Millisecond)))
		}
		plans[i] = pl
	}

	var (
		mu         sync.Mutex
		unexpected []string
		completed  int
	)
	// The whole load is bounded: past this deadline every request left
	// fails at once and the test reports them.
	load, stop := context.WithTimeout(t.Context(), 30*time.Second)
	defer stop()
	do := func(pl leakPlan) {
		ctx, cancel := context.WithTimeout(load, 10*time.Second)
		defer cancel()
		if pl.cancelAfter > 0 {
			defer time.AfterFunc(pl.cancelAfter, cancel).Stop()
		}
		method, body := http.MethodGet, io.Reader(nil)
		if pl.post {
			method, body = http.MethodPost, strings.NewReader(`{"n":1}`)
		}
		req, _ := http.NewRequestWithContext(ctx, method, p.url+"/v1/leak", body)
		req.Header.Set("X-Fault", pl.fault)
		res, err := client.Do(req)
		var got []byte
		if err == nil {
			got, err = io.ReadAll(res.Body)
			res.Body.Close()
		}
		mu.Lock()
		defer mu.Unlock()
		if pl.cancelAfter > 0 {
			return // any outcome will do for a client that gave up
		}
		switch {
		case err != nil:
			unexpected = append(unexpected, pl.fault+": "+err.Error())
		case res.StatusCode != wantStatus[pl.fault]:
			unexpected = append(unexpected, pl.fault+": status "+strconv.Itoa(res.StatusCode))
		case wantBody[pl.fault] != "" && string(got) != wantBody[pl.fault]:
			unexpected = append(unexpected, pl.fault+": body "+strconv.Quote(string(got)))
		default:
			completed++
		}
	}
	start := time.Now()
	work := make(chan leakPlan)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for pl := range work {
				do(pl)
			}
		})
	}
	for _, pl := range plans {
		work <- pl
	}
	close(work)
	wg.Wait()
	elapsed := time.Since(start)
	for i, u := range unexpected {
		if i == 5 {
			t.Errorf("... and %d more", len(unexpected)-5)
			break
		}
		t.Errorf("unexpected outcome: %s", u)
	}

	// Idle keep-alive connections are not leaks: close them, then poll
	// (bounded) until the counts settle.
	const slack = 3
	var g, fd int
	for range 250 {
		tr.CloseIdleConnections()
		p.srv.transport.CloseIdleConnections()
		g, fd = runtime.NumGoroutine(), openFDs(t)
		if g <= baseG+slack && fd <= baseFD+slack {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d requests (%d completed as planned) in %v; goroutines %d before, %d after; open fds %d before, %d after",
		len(plans), completed, elapsed.Round(time.Millisecond), baseG, g, baseFD, fd)
	if g > baseG+slack {
		buf := make([]byte, 64<<10)
		t.Errorf("goroutines: %d after the load; want at most %d (baseline %d + %d)\n%s",
			g, baseG+slack, baseG, slack, buf[:runtime.Stack(buf, true)])
	}
	if fd > baseFD+slack {
		t.Errorf("open file descriptors: %d after the load; want at most %d (baseline %d + %d)", fd, baseFD+slack, baseFD, slack)
	}
	if n := len(p.srv.slots); n != 0 {
		t.Errorf("%d concurrency slots still taken; want 0", n)
	}
	if n := p.srv.metrics.bodyBudget.Load(); n != 0 {
		t.Errorf("body budget has %d bytes in use; want 0", n)
	}
	if n := p.srv.metrics.inFlight.Load(); n != 0 {
		t.Errorf("%d requests in flight; want 0", n)
	}
	if strings.Contains(p.logs.String(), "panic") {
		t.Error("the log mentions a panic")
	}
}

func TestAsteriskFormNotReencoded(t *testing.T) {
	// "OPTIONS *" is proxied like any other request (SPEC: only GET and
	// HEAD of /health and /metrics are local); joined with the upstream
	// URL its target is "/*", sent as such, not re-encoded as "/%2A".
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	res := rawRequest(t, p.addr, "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	res.Body.Close()
	got, _ := u.request()
	if res.StatusCode != http.StatusOK || got == nil || got.Method != http.MethodOptions || got.RequestURI != "/*" {
		t.Fatalf("status %d, upstream saw %v; want OPTIONS /* answered by the upstream", res.StatusCode, got)
	}
}

func TestTargetWithoutPathIs400(t *testing.T) {
	// net/http accepts "http:foo" as a request target (an absolute URL
	// without "//"), but it has no path to join to upstream_url: the
	// proxy refuses it rather than send an invalid request line upstream.
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	for _, target := range []string{"http:foo", "https:evil.example:8443/x?y=1", "mailto:a@evil.example"} {
		res := rawRequest(t, p.addr, "GET "+target+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		if e := readError(t, res, http.StatusBadRequest); e.Error.Message != "request target must be a path" {
			t.Errorf("%s: message = %q", target, e.Error.Message)
		}
	}
	if n := u.hits.Load(); n != 0 {
		t.Errorf("upstream saw %d requests; want none", n)
	}
	p.logs.waitRequests(t, 3)
	checkMetrics(t, p, map[string]string{
		`proxy_upstream_errors_total{error_type="invalid_request"}`: "3",
		`proxy_upstream_errors_total{error_type="connection"}`:      "0",
	})
}

// A POST whose client gave up while it waited for a slot is not sent
// upstream once the slot frees: net/http sees the disconnect only after the
// body is read, and the proxy looks before forwarding.
func TestQueuedPostFromGoneClientIsNotForwarded(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan string, 4)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- r.URL.Path
		if r.URL.Path == "/holder" {
			<-release
		}
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.MaxConnections = 1
	p := startProxy(t, cfg, testTuning)
	go testClient(t).Get(p.url + "/holder")
	<-entered

	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
	waitQueuedSlot(t, p)
	c.Close() // gives up while queued
	close(release)
	lines := p.logs.waitRequests(t, 2)
	for _, l := range lines {
		if l["path"] == "/gone" && l["status"] != float64(499) {
			t.Errorf("gone client's request logged %v; want 499", l)
		}
	}
	select {
	case path := <-entered:
		t.Errorf("%s reached the upstream after its client left", path)
	default:
	}
}

// waitQueuedSlot waits until a request is waiting for p's only slot: the
// handler has started (the request log is written only at its end), so it
// polls the server's in-flight count through the slot channel's fullness
// and a short settle.
func waitQueuedSlot(t testing.TB, p *testProxy) {
	t.Helper()
	waitGauge(t, &p.srv.metrics.waiting[waitSlot], 1)
}

// An upstream that accepts the request but stops reading its body would
// hold it before any response timeout starts; the proxy gives up after
// timeout_secs without progress: 504, not retried.
func TestUpstreamThatStopsReadingTheBody(t *testing.T) {
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { // a small window: the body cannot hide in buffers
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
	}}
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := newRawUpstreamOn(t, ln, silent(t))
	cfg := testConfig(t, u.url())
	cfg.Timeout = 300 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	body := bytes.Repeat([]byte("x"), 10<<20)
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusGatewayTimeout)
	if e.Error.Message != "upstream stopped reading the request body for 300ms" {
		t.Errorf("message = %q", e.Error.Message)
	}
	if n := u.accepted.Load(); n != 1 {
		t.Errorf("upstream accepted %d connections; want 1 (not retried)", n)
	}
}
