package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
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

// The tests here drive the real proxy listener on 127.0.0.1, many of them
// against an upstream or a client that misbehaves in one specific way, and
// state the outcome the proxy owes.

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

// Routing: the local endpoints, and everything else proxied.

func TestLocalRoutes(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	tests := []struct {
		method, path string
		proxied      bool
	}{
		{"GET", "/health", false},
		{"HEAD", "/health", false},
		{"GET", "/metrics", false},
		{"HEAD", "/metrics", false},
		{"POST", "/health", true},
		{"DELETE", "/metrics", true},
		{"GET", "/healthz", true},
		{"GET", "/health/", true},
		{"GET", "/%68ealth", true},
		{"GET", "//health", true},
	}
	for _, tt := range tests {
		before := u.hits.Load()
		res := rawRequest(t, p.addr, tt.method+" "+tt.path+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		res.Body.Close()
		if proxied := u.hits.Load() > before; proxied != tt.proxied || res.StatusCode != 200 {
			t.Errorf("%s %s: status %d, proxied %v; want 200, proxied %v", tt.method, tt.path, res.StatusCode, proxied, tt.proxied)
		}
	}
	p.logs.waitRequests(t, 6) // each is counted when its handler returns
	m := metricsText(t, p)
	if got := metricValue(m, `proxy_requests_total{status="200",method="GET"}`); got != "4" {
		t.Errorf("proxied GETs counted %q; want 4 (probes and scrapes are not counted):\n%s", got, m)
	}
}

func TestLocalEndpointsAnswerWhenSlotsAreFull(t *testing.T) {
	release := make(chan struct{})
	var inFlight sync.WaitGroup
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inFlight.Done()
		<-release
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.MaxConnections = 2
	p := startProxy(t, cfg, testTuning)
	c := testClient(t)
	inFlight.Add(2)
	results := make(chan int, 3)
	for range 3 { // two hold the slots, the third waits
		go func() {
			res, err := c.Get(p.url + "/v1/slow")
			if err != nil {
				results <- 0
				return
			}
			res.Body.Close()
			results <- res.StatusCode
		}()
	}
	inFlight.Wait()
	for _, path := range []string{"/health", "/metrics"} {
		res, err := c.Get(p.url + path)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Errorf("%s = %d while all slots are held; want 200", path, res.StatusCode)
		}
	}
	select {
	case code := <-results:
		t.Fatalf("a request finished (%d) while both slots were held", code)
	default:
	}
	inFlight.Add(1) // the waiting request reaches the upstream once a slot frees
	close(release)
	for range 3 {
		if code := <-results; code != 200 {
			t.Errorf("request got %d; want 200", code)
		}
	}
}

// Admission: refusals before the request waits, and the concurrency slot.

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

func TestRequestHeaderLimits(t *testing.T) {
	// Refused before the request waits for anything: the only slot is
	// taken throughout.
	up, entered, _ := holdingUpstream(t)
	cfg := testConfig(t, up.URL)
	cfg.MaxConnections = 1
	p := startProxy(t, cfg, testTuning)
	go testClient(t).Get(p.url + "/v1/holder")
	<-entered
	fields := func(n int) string {
		var b strings.Builder
		for i := range n {
			b.WriteString("X-F" + strconv.Itoa(i) + ": v\r\n")
		}
		return b.String()
	}
	big := func(n int) string { return "X-Big: " + strings.Repeat("h", n) + "\r\n" }
	tests := []struct {
		name    string
		headers string // besides Host
		status  int    // 0: not refused (it waits for the slot)
		json    bool
		reason  string
	}{
		{"100 fields pass", fields(99), 0, false, ""},
		{"101 fields", fields(100), 431, true, "too_many_headers"},
		{"30 KiB pass", big(30 << 10), 0, false, ""},
		{"over 32 KiB", big(33 << 10), 431, true, "headers_too_large"},
		{"over 36 KiB: net/http's own 431", big(40 << 10), 431, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("tcp", p.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			io.WriteString(c, "GET /v1/models HTTP/1.1\r\nHost: x\r\n"+tt.headers+"\r\n")
			if tt.status == 0 {
				// Admitted: it waits for the slot until its client leaves.
				waitGauge(t, &p.srv.metrics.waiting[waitSlot], 1)
				c.Close()
				waitGauge(t, &p.srv.metrics.waiting[waitSlot], 0)
				return
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			res, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.json {
				res.Body.Close()
				if res.StatusCode != tt.status {
					t.Errorf("status %d; want %d", res.StatusCode, tt.status)
				}
				return
			}
			readError(t, res, tt.status)
			if got := metricValue(metricsText(t, p), `proxy_refused_total{reason="`+tt.reason+`"}`); got != "1" {
				t.Errorf("refused %s = %q; want 1", tt.reason, got)
			}
		})
	}
	select {
	case path := <-entered:
		t.Errorf("%s reached the upstream", path)
	default:
	}
}

func TestClientGoneWhileWaitingForSlotIsNeverSent(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	var hits atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		entered <- struct{}{}
		<-release
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() { close(release) })
	cfg := testConfig(t, up.URL)
	cfg.MaxConnections = 1
	p := startProxy(t, cfg, testTuning)
	c := testClient(t)
	go c.Get(p.url + "/v1/holder")
	<-entered

	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", p.url+"/v1/waiter", nil)
		_, err := c.Do(req)
		errc <- err
	}()
	// The waiter gives up once it waits for the slot.
	waitGauge(t, &p.srv.metrics.waiting[waitSlot], 1)
	cancel()
	if err := <-errc; err == nil {
		t.Fatal("cancelled request succeeded")
	}
	l := p.logs.waitRequests(t, 1)[0]
	if l["path"] != "/v1/waiter" || l["status"] != float64(499) {
		t.Errorf("log line = %v; want the waiter with status 499", l)
	}
	if hits.Load() != 1 {
		t.Errorf("upstream saw %d requests; want only the holder", hits.Load())
	}
}

// Rewrite: the request target, the upstream host, the body's framing.

func TestPathAndQueryByteExact(t *testing.T) {
	targets := []string{
		"/v1/messages?beta=true",
		"/v1/x?a=1;b=2&c=%zz",
		"/v1/files/a%2Fb/content",
		"/v1/%7Euser/x?q=%20+&empty=&=v",
		"/v1/odd/!$&'()*+,;=:@",
		"/v1/x?",
		"/./x",
		"/a/../b",
		"//evil.example/x",
		"/healthz",
	}
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	for _, target := range targets {
		t.Run(target, func(t *testing.T) {
			res := rawRequest(t, p.addr, "GET "+target+" HTTP/1.1\r\nHost: proxy.local\r\nConnection: close\r\n\r\n")
			res.Body.Close()
			if res.StatusCode != 200 {
				t.Fatalf("status = %d; want 200", res.StatusCode)
			}
			got, _ := u.request()
			if got.RequestURI != target {
				t.Errorf("upstream request target = %q; want %q", got.RequestURI, target)
			}
			if got.Host != u.Listener.Addr().String() {
				t.Errorf("upstream Host = %q; want %q", got.Host, u.Listener.Addr().String())
			}
		})
	}
}

func TestPathsByteForByte(t *testing.T) {
	// The request target reaches the upstream as sent, whatever url.URL
	// would escape, over HTTP/1 and HTTP/2.
	targets := []string{
		`/v1/a|b{c}^d"e`,
		"/v1/a|b?x=|&y={}",
		"/v1/%7C|%2F/x",
		"/v1/messages?beta=true",
	}
	for _, h2 := range []bool{false, true} {
		got := make(chan string, 1)
		up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			got <- r.RequestURI
		}))
		up.EnableHTTP2 = h2
		up.StartTLS()
		t.Cleanup(up.Close)
		p := startProxy(t, testConfig(t, up.URL), testTuning)
		p.srv.transport.TLSClientConfig = &tls.Config{RootCAs: up.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
		for _, target := range targets {
			res := rawRequest(t, p.addr, "GET "+target+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
			res.Body.Close()
			if res.StatusCode != 200 {
				t.Errorf("h2=%v %s: status %d", h2, target, res.StatusCode)
				continue
			}
			if uri := <-got; uri != target {
				t.Errorf("h2=%v: upstream got %q; want %q", h2, uri, target)
			}
		}
	}
}

func TestAbsoluteFormCannotChangeUpstream(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	res := rawRequest(t, p.addr, "GET http://evil.example/steal?x=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
	res.Body.Close()
	got, _ := u.request()
	if res.StatusCode != 200 || got == nil || got.Host != u.Listener.Addr().String() || got.RequestURI != "/steal?x=1" {
		t.Fatalf("status %d, upstream saw %v; want the request on the upstream host as /steal?x=1", res.StatusCode, got)
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

func TestRequestTrailersNeverForwarded(t *testing.T) {
	// Over HTTP/2 a request's trailers travel in a HEADERS frame of their
	// own; through it, a removed x-api-key or a second Authorization
	// would reach the upstream behind the header rules' back.
	for _, h2 := range []bool{false, true} {
		got := make(chan http.Header, 1)
		up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			all := r.Header.Clone()
			for k, v := range r.Trailer {
				all["Trailer-"+k] = v
			}
			got <- all
		}))
		up.EnableHTTP2 = h2
		up.StartTLS()
		t.Cleanup(up.Close)
		cfg := testConfig(t, up.URL)
		cfg.Headers = append(cfg.Headers, HeaderRule{Name: "x-api-key", Mode: HeaderRemove})
		p := startProxy(t, cfg, testTuning)
		p.srv.transport.TLSClientConfig = &tls.Config{RootCAs: up.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
		res := rawRequest(t, p.addr, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer first\r\n"+
			"Transfer-Encoding: chunked\r\nTrailer: X-Api-Key, Authorization\r\n\r\n"+
			"2\r\n{}\r\n0\r\nX-Api-Key: sk-stray\r\nAuthorization: Bearer second\r\n\r\n")
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Fatalf("h2=%v: status %d", h2, res.StatusCode)
		}
		h := <-got
		if v := h["Authorization"]; len(v) != 1 || v[0] != "Bearer first" {
			t.Errorf("h2=%v: upstream Authorization %q; want only the client's header", h2, v)
		}
		for k := range h {
			if k == "X-Api-Key" || strings.HasPrefix(k, "Trailer-") || k == "Trailer" {
				t.Errorf("h2=%v: upstream got %s: %q", h2, k, h[k])
			}
		}
	}
}

// Header rules, and the hop-by-hop headers dropped both ways.

func TestHeaderModes(t *testing.T) {
	tests := []struct {
		name   string
		rule   HeaderRule
		client http.Header
		want   []string // upstream's values for the rule's header; nil = absent
	}{
		{"set adds", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20"}, nil, []string{"oauth-2025-04-20"}},
		{"set replaces every client value", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20"},
			http.Header{"Anthropic-Beta": {"a", "b"}}, []string{"oauth-2025-04-20"}},
		{"append to absent", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
			nil, []string{"oauth-2025-04-20"}},
		{"append keeps client order", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
			http.Header{"Anthropic-Beta": {"a,b"}}, []string{"a,b,oauth-2025-04-20"}},
		{"append does not duplicate", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
			http.Header{"Anthropic-Beta": {"a, OAuth-2025-04-20 ,b"}}, []string{"a, OAuth-2025-04-20 ,b"}},
		{"append joins client lines into one", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
			http.Header{"Anthropic-Beta": {"a", "b"}}, []string{"a,b,oauth-2025-04-20"}},
		{"append several tokens", HeaderRule{Name: "anthropic-beta", Value: "x, y", Mode: HeaderAppend},
			http.Header{"Anthropic-Beta": {"y"}}, []string{"y,x"}},
		{"append to empty client value", HeaderRule{Name: "anthropic-beta", Value: "oauth-2025-04-20", Mode: HeaderAppend},
			http.Header{"Anthropic-Beta": {""}}, []string{"oauth-2025-04-20"}},
		{"remove", HeaderRule{Name: "X-Api-Key", Mode: HeaderRemove},
			http.Header{"X-Api-Key": {"sk-ant-stray"}}, nil},
		{"remove absent", HeaderRule{Name: "x-api-key", Mode: HeaderRemove}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newEchoUpstream(t)
			cfg := testConfig(t, u.URL)
			cfg.Headers = []HeaderRule{tt.rule}
			p := startProxy(t, cfg, testTuning)
			got := send(t, p, u, "POST", "/v1/messages", tt.client)
			key := http.CanonicalHeaderKey(tt.rule.Name)
			if diff := cmp.Diff(tt.want, got.Header[key]); diff != "" {
				t.Errorf("upstream %s (-want +got):\n%s", key, diff)
			}
		})
	}
}

func TestAuthorizationUntouched(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	const token = "Bearer sk-ant-oat01-secret"
	got := send(t, p, u, "POST", "/v1/messages", http.Header{
		"Authorization": {token},
		"Connection":    {"Authorization, X-Named"},
		"X-Named":       {"dropped"},
	})
	if diff := cmp.Diff([]string{token}, got.Header["Authorization"]); diff != "" {
		t.Errorf("Authorization (-want +got):\n%s", diff)
	}
	if v, ok := got.Header["X-Named"]; ok {
		t.Errorf("header named in Connection reached the upstream: %q", v)
	}
	if strings.Contains(p.logs.String(), "sk-ant") {
		t.Errorf("a header value was logged:\n%s", p.logs.String())
	}
}

func TestRequestHeadersForwarded(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	got := send(t, p, u, "POST", "/v1/messages", http.Header{
		"Connection":          {"keep-alive, X-Hop"},
		"X-Hop":               {"1"},
		"Keep-Alive":          {"timeout=5"},
		"Te":                  {"trailers"},
		"Trailer":             {"X-T"},
		"Upgrade":             {"websocket"},
		"Proxy-Authorization": {"Basic eA=="},
		"Proxy-Connection":    {"keep-alive"},
		"Forwarded":           {"for=10.0.0.1"},
		"X-Forwarded-For":     {"10.0.0.1"},
		"X-Forwarded-Host":    {"evil.example"},
		"X-Forwarded-Proto":   {"https"},
		"X-Forwarded-Port":    {"443"},
		"X-Multi":             {"one", "two", "three"},
		"Anthropic-Version":   {"2023-06-01"},
		"User-Agent":          {"claude-cli/2.0"},
	})
	if got.Host != u.Listener.Addr().String() {
		t.Errorf("Host = %q; want the upstream host %q", got.Host, u.Listener.Addr().String())
	}
	for _, h := range []string{"Connection", "X-Hop", "Keep-Alive", "Te", "Trailer", "Upgrade",
		"Proxy-Authorization", "Proxy-Connection", "Forwarded", "X-Forwarded-For",
		"X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "Via", "Accept-Encoding"} {
		if v, ok := got.Header[h]; ok {
			t.Errorf("upstream received %s: %q", h, v)
		}
	}
	want := http.Header{
		"X-Multi":           {"one", "two", "three"},
		"Anthropic-Version": {"2023-06-01"},
		"User-Agent":        {"claude-cli/2.0"},
		"Anthropic-Beta":    {"oauth-2025-04-20"},
	}
	for k, v := range want {
		if diff := cmp.Diff(v, got.Header[k]); diff != "" {
			t.Errorf("%s (-want +got):\n%s", k, diff)
		}
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

func TestExpectContinueAnsweredOnce(t *testing.T) {
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("first line %q, %v; want 100 Continue", line, err)
	}
	if blank, _ := br.ReadString('\n'); blank != "\r\n" {
		t.Fatalf("100 Continue followed by %q", blank)
	}
	io.WriteString(c, "hello")
	rest, _ := io.ReadAll(br)
	if !strings.HasPrefix(string(rest), "HTTP/1.1 200 OK\r\n") || strings.Contains(string(rest), "100 Continue") {
		t.Errorf("after the body got %q; want a single 200 response", rest)
	}
	got, body := u.request()
	if string(body) != "hello" || got.Header.Get("Expect") != "" {
		t.Errorf("upstream got body %q, Expect %q; want hello and no Expect", body, got.Header.Get("Expect"))
	}
}

func TestNoCompressionAdded(t *testing.T) {
	gz := []byte{0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}
	var seen atomic.Value
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.Header.Values("Accept-Encoding"))
		if r.Header.Get("Accept-Encoding") != "" {
			w.Header().Set("Content-Encoding", "gzip")
			w.Write(gz)
		}
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	c := testClient(t)

	res, err := c.Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if got := seen.Load().([]string); len(got) != 0 {
		t.Errorf("upstream received Accept-Encoding %q from a client that sent none", got)
	}

	req, _ := http.NewRequest("GET", p.url+"/v1/models", nil)
	req.Header.Set("Accept-Encoding", "gzip")
	res, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if !bytes.Equal(body, gz) || res.Header.Get("Content-Encoding") != "gzip" {
		t.Errorf("client got %x (Content-Encoding %q); want the upstream's gzip bytes unchanged", body, res.Header.Get("Content-Encoding"))
	}
}

// Retry transport: phase-2 timeouts, attempts, and what is not retried.

func TestHeaderTimeoutRetriedThen504(t *testing.T) {
	var attempts atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts.Add(1)
		body, _ := io.ReadAll(r.Body)
		if string(body) != `{"stream":true}` {
			t.Errorf("attempt %d got body %q", attempts.Load(), body)
		}
		<-r.Context().Done() // never answers
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 200 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader(`{"stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusGatewayTimeout)
	if got := attempts.Load(); got != 3 {
		t.Errorf("upstream saw %d attempts; want 3", got)
	}
	if res.Header.Get("X-Should-Retry") != "false" {
		t.Errorf("x-should-retry = %q; want false", res.Header.Get("X-Should-Retry"))
	}
	if e.Error.Message != "upstream response timeout after 200ms (3 attempts)" {
		t.Errorf("message = %q", e.Error.Message)
	}
	l := p.logs.waitRequests(t, 1)[0]
	if l["request_id"] != e.Error.RequestID || l["status"] != float64(504) || l["attempts"] != float64(3) {
		t.Errorf("log line = %v; want the error's request_id, status 504, 3 attempts", l)
	}
	m := metricValue(metricsText(t, p), `proxy_upstream_errors_total{error_type="timeout"}`)
	if m != "1" {
		t.Errorf("timeout errors = %q; want 1 (once per request, not per attempt)", m)
	}
}

func TestHeaderTimeoutDetectedOverHTTP1AndHTTP2(t *testing.T) {
	// The phase-2 timer is the proxy's own (retryTransport): it must end
	// each attempt, and be told apart from other failures, over both
	// transports.
	for _, h2 := range []bool{false, true} {
		var protos []string
		var mu sync.Mutex
		cancelled := make(chan struct{}, 3)
		up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			protos = append(protos, r.Proto)
			mu.Unlock()
			<-r.Context().Done()
			cancelled <- struct{}{}
		}))
		up.EnableHTTP2 = h2
		up.StartTLS()
		cfg := testConfig(t, up.URL)
		cfg.Timeout = 200 * time.Millisecond
		p := startProxy(t, cfg, testTuning)
		p.srv.transport.TLSClientConfig = &tls.Config{RootCAs: up.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
		res, err := testClient(t).Get(p.url + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		e := readError(t, res, http.StatusGatewayTimeout)
		if e.Error.Message != "upstream response timeout after 200ms (3 attempts)" {
			t.Errorf("h2=%v: message = %q", h2, e.Error.Message)
		}
		for range 3 {
			select {
			case <-cancelled:
			case <-time.After(5 * time.Second):
				t.Fatalf("h2=%v: an attempt was not cancelled at the upstream", h2)
			}
		}
		want := "HTTP/1.1"
		if h2 {
			want = "HTTP/2.0"
		}
		mu.Lock()
		if diff := cmp.Diff([]string{want, want, want}, protos); diff != "" {
			t.Errorf("h2=%v: upstream attempts (-want +got):\n%s", h2, diff)
		}
		mu.Unlock()
		up.Close()
	}
}

func TestHTTP2ToTLSUpstream(t *testing.T) {
	var proto atomic.Value
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proto.Store(r.Proto)
	}))
	up.EnableHTTP2 = true
	up.StartTLS()
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	p.srv.transport.TLSClientConfig = &tls.Config{RootCAs: up.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs}
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 || proto.Load() != "HTTP/2.0" {
		t.Errorf("status %d, upstream protocol %v; want 200 over HTTP/2.0", res.StatusCode, proto.Load())
	}
}

func TestRetryPauseEndsWhenClientLeaves(t *testing.T) {
	attempts := make(chan struct{}, 4)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers; done once the proxy gives up
		attempts <- struct{}{}
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 100 * time.Millisecond
	tun := testTuning
	tun.retryPause = time.Hour // the pause must end with the client, not the clock
	p := startProxy(t, cfg, tun)
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "GET", p.url+"/v1/models", nil)
		_, err := testClient(t).Do(req)
		errc <- err
	}()
	<-attempts // the first attempt timed out: the proxy is pausing
	cancel()
	<-errc
	l := p.logs.waitRequests(t, 1)[0]
	if l["status"] != float64(499) || l["attempts"] != float64(1) {
		t.Errorf("log line = %v; want 499 after 1 attempt", l)
	}
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

func TestUpstreamErrorsNotRetried(t *testing.T) {
	for _, status := range []int{500, 503, 529, 429} {
		var hits atomic.Int64
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.WriteHeader(status)
		}))
		p := startProxy(t, testConfig(t, up.URL), testTuning)
		res, err := testClient(t).Get(p.url + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != status || hits.Load() != 1 {
			t.Errorf("upstream %d: client got %d after %d upstream attempts; want %d after 1", status, res.StatusCode, hits.Load(), status)
		}
		if got := metricValue(metricsText(t, p), `proxy_upstream_errors_total{error_type="connection"}`); got != "0" {
			t.Errorf("upstream %d counted as a proxy error: %s", status, got)
		}
		up.Close()
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

// Response and stream: the upstream's headers and status, events as they

// come, idle and broken streams, clients that leave.

func TestResponseHeadersAndStatusPassThrough(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Connection", "X-Resp-Hop")
		h.Set("X-Resp-Hop", "1")
		h.Set("Keep-Alive", "timeout=5")
		h.Set("Proxy-Authenticate", "Basic")
		h["Set-Cookie"] = []string{"a=1", "b=2"}
		h.Set("Request-Id", "req_011CUpstream")
		w.WriteHeader(529)
		w.Write([]byte(`{"type":"error","error":{"type":"overloaded_error"}}`))
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 529 || string(body) != `{"type":"error","error":{"type":"overloaded_error"}}` {
		t.Errorf("got %d %q; want the upstream's 529 and body verbatim", res.StatusCode, body)
	}
	for _, h := range []string{"X-Resp-Hop", "Keep-Alive", "Proxy-Authenticate"} {
		if v, ok := res.Header[h]; ok {
			t.Errorf("client received hop-by-hop %s: %q", h, v)
		}
	}
	if diff := cmp.Diff([]string{"a=1", "b=2"}, res.Header["Set-Cookie"]); diff != "" {
		t.Errorf("Set-Cookie (-want +got):\n%s", diff)
	}
	lines := p.logs.waitRequests(t, 1)
	if lines[0]["upstream_request_id"] != "req_011CUpstream" || lines[0]["status"] != float64(529) {
		t.Errorf("log line = %v; want status 529 and upstream_request_id", lines[0])
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

// sseUpstream sends event 1, then waits for next before sending event 2.
func TestSSEEventsArriveOneByOne(t *testing.T) {
	next := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "event: message_start\ndata: {\"n\":1}\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "event: message_stop\ndata: {\"n\":2}\n\n")
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader(`{"stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	br := bufio.NewReader(res.Body)
	read := func() string {
		var ev strings.Builder
		for {
			line, err := br.ReadString('\n')
			ev.WriteString(line)
			if err != nil || line == "\n" {
				return ev.String()
			}
		}
	}
	done := make(chan string, 1)
	go func() { done <- read() }()
	select {
	case ev := <-done:
		if ev != "event: message_start\ndata: {\"n\":1}\n\n" {
			t.Fatalf("first event = %q", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("event 1 did not reach the client before the upstream sent event 2: the stream is buffered")
	}
	close(next)
	if ev := read(); ev != "event: message_stop\ndata: {\"n\":2}\n\n" {
		t.Fatalf("second event = %q", ev)
	}
}

func TestLongStreamThatKeepsSendingSurvives(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 24 { // 24 × 100 ms = 2.4 s, more than twice the timeout
			io.WriteString(w, "data: "+strconv.Itoa(i)+"\n\n")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond) // the upstream's own pace, under the timeout
		}
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = time.Second
	p := startProxy(t, cfg, testTuning)
	res, err := testClient(t).Get(p.url + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || strings.Count(string(body), "data: ") != 24 {
		t.Fatalf("read %q, %v; want all 24 events\n%s", body, err, p.logs.String())
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["error"] != nil {
		t.Errorf("log line has error %v", l["error"])
	}
}

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

func TestIdleStreamIsCut(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done() // then silence
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 200 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	res, err := testClient(t).Get(p.url + "/v1/stream")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err == nil || string(body) != "data: first\n\n" {
		t.Fatalf("read %q, err %v; want the first event, then a broken stream", body, err)
	}
	l := p.logs.waitRequests(t, 1)[0]
	if l["error"] != "upstream stream idle for 200ms, closed" || l["status"] != float64(200) || l["level"] != "WARN" {
		t.Errorf("log line = %v; want status 200 and the idle error at WARN", l)
	}
	m := metricsText(t, p)
	if got := metricValue(m, `proxy_stream_errors_total{error_type="timeout"}`); got != "1" {
		t.Errorf("stream timeout errors = %q; want 1", got)
	}
	if got := metricValue(m, `proxy_upstream_errors_total{error_type="timeout"}`); got != "0" {
		t.Errorf("upstream timeout errors = %q; want 0: the response was the upstream's", got)
	}
}

func TestStreamCutMidBodyLogsOnce(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(200)
		io.WriteString(w, "partial")
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	res, err := testClient(t).Get(p.url + "/v1/files/x")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err == nil {
		t.Fatalf("client read %q without an error; want a broken stream", body)
	}
	lines := p.logs.waitRequests(t, 1)
	if e, _ := lines[0]["error"].(string); !strings.HasPrefix(e, "upstream stream failed: ") {
		t.Errorf("log line = %v; want error set", lines[0])
	}
	if got := metricValue(metricsText(t, p), `proxy_stream_errors_total{error_type="connection"}`); got != "1" {
		t.Errorf("stream connection errors = %q; want 1", got)
	}
	for _, l := range p.logs.lines(t) {
		if l["msg"] != "request" && l["level"] != "INFO" {
			t.Errorf("extra log line %v", l)
		}
	}
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

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	cancelled := make(chan struct{})
	sent := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: 1\n\n")
		w.(http.Flusher).Flush()
		close(sent)
		<-r.Context().Done()
		close(cancelled)
	}))
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	ctx, cancel := context.WithCancel(t.Context())
	req, _ := http.NewRequestWithContext(ctx, "POST", p.url+"/v1/messages", strings.NewReader("{}"))
	res, err := testClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	<-sent
	res.Body.Read(make([]byte, 64))
	cancel()
	select {
	case <-cancelled:
	case <-time.After(time.Second):
		t.Fatal("upstream request not cancelled within 1 s of the client leaving")
	}
	l := p.logs.waitRequests(t, 1)[0]
	if l["status"] != float64(499) || l["level"] != "INFO" {
		t.Errorf("log line = %v; want status 499 at INFO", l)
	}
	m := metricsText(t, p)
	for series, want := range map[string]string{
		`proxy_requests_total{status="499",method="POST"}`:          "1",
		`proxy_upstream_errors_total{error_type="connection"}`:      "0",
		`proxy_upstream_errors_total{error_type="timeout"}`:         "0",
		`proxy_upstream_errors_total{error_type="invalid_request"}`: "0",
	} {
		if got := metricValue(m, series); got != want {
			t.Errorf("%s = %q; want %s", series, got, want)
		}
	}
	if p.srv.metrics.errorsTotal() != 0 {
		t.Errorf("errors_total = %d; want 0", p.srv.metrics.errorsTotal())
	}
}

// Errors: an upstream that cannot be reached or answers no HTTP, and the

// proxy's own error responses.

func TestClosedPortIs502(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p := startProxy(t, testConfig(t, "http://"+addr), testTuning)
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusBadGateway)
	if want := "upstream " + addr + ": connection refused"; e.Error.Message != want {
		t.Errorf("message = %q; want %q", e.Error.Message, want)
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["attempts"] != float64(1) || l["status"] != float64(502) {
		t.Errorf("log line = %v; want 1 attempt, status 502", l)
	}
	if got := metricValue(metricsText(t, p), `proxy_upstream_errors_total{error_type="connection"}`); got != "1" {
		t.Errorf("connection errors = %q; want 1", got)
	}
}

func TestTCPConnectTimeoutIs502NotRetried(t *testing.T) {
	addr := fullBacklogListener(t)
	tun := testTuning
	tun.connectTimeout = 300 * time.Millisecond
	p := startProxy(t, testConfig(t, "http://"+addr), tun)
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusBadGateway)
	if want := "upstream " + addr + ": connect timeout after 300ms"; e.Error.Message != want {
		t.Errorf("message = %q; want %q", e.Error.Message, want)
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["attempts"] != float64(1) {
		t.Errorf("log line = %v; want 1 attempt", l)
	}
}

func TestTLSHandshakeTimeoutIs502NotRetried(t *testing.T) {
	// A TCP server that accepts and never speaks TLS: the handshake times
	// out, which is a connection failure.
	u := newRawUpstream(t, silent(t))
	tun := testTuning
	tun.tlsTimeout = 300 * time.Millisecond
	p := startProxy(t, testConfig(t, "https://"+u.addr), tun)
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusBadGateway)
	if want := "upstream " + u.addr + ": TLS handshake timeout after 300ms"; e.Error.Message != want {
		t.Errorf("message = %q; want %q", e.Error.Message, want)
	}
	if n := u.accepted.Load(); n != 1 {
		t.Errorf("upstream accepted %d connections; want 1 (not retried)", n)
	}
}

func TestUntrustedTLSIs502(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	up.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshake failure is expected
	t.Cleanup(up.Close)
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusBadGateway)
	if want := "upstream " + strings.TrimPrefix(up.URL, "https://") + ": TLS certificate not trusted: signed by an unknown authority"; e.Error.Message != want {
		t.Errorf("message = %q; want %q", e.Error.Message, want)
	}
}

func TestDNSFailureNamesNoAddress(t *testing.T) {
	// The cluster's resolver address is in the error; only the log line
	// may show it. The resolver is the test's: no lookup leaves the process.
	tun := testTuning
	tun.resolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
		return nil, &net.OpError{Op: "dial", Net: network, Addr: fakeAddr("10.96.0.10:53"), Err: errors.New("connect: network is unreachable")}
	}}
	p := startProxy(t, testConfig(t, "https://api.anthropic.invalid"), tun)
	res, err := testClient(t).Get(p.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusBadGateway)
	if want := "upstream api.anthropic.invalid: DNS lookup failed"; e.Error.Message != want {
		t.Errorf("message = %q; want %q", e.Error.Message, want)
	}
	if msg, _ := p.logs.waitRequests(t, 1)[0]["error"].(string); !strings.Contains(msg, "10.96.0.10") {
		t.Errorf("log error = %q; want the full error, with the resolver's address", msg)
	}
}

// fakeAddr is a net.Addr for an error message.
type fakeAddr string

func (a fakeAddr) Network() string { return "udp" }
func (a fakeAddr) String() string  { return string(a) }

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

func TestProxyErrorsAsTheSDKsSeeThem(t *testing.T) {
	// The SDKs and Claude Code act on the status, error.type and
	// x-should-retry, and parse the body as an API error: every response
	// the proxy makes itself is compared whole, headers and bytes.
	never, _ := countingUpstream(t, -1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()

	tests := []struct {
		name     string
		upstream string
		request  string
		status   int
		message  string
		header   http.Header // besides Content-Type and Content-Length
	}{
		{"request target without a path", never.URL,
			"GET http:foo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
			http.StatusBadRequest, "request target must be a path", nil},
		{"body over max_body_bytes", never.URL,
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nConnection: close\r\n\r\n{\"stream\":false}\n",
			http.StatusRequestEntityTooLarge, "request body exceeds 16 bytes", nil},
		{"upstream refuses the connection", "http://" + closed,
			"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
			http.StatusBadGateway, "upstream " + closed + ": connection refused", nil},
		{"body stalls", never.URL,
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{}",
			http.StatusRequestTimeout, "request body stalled: no data for 100ms", nil},
		{"101 header fields", never.URL,
			"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + strings.Repeat("X-A: b\r\n", 100) + "Connection: close\r\n\r\n",
			http.StatusRequestHeaderFieldsTooLarge, "request has 102 header fields, more than 100", nil},
		{"streaming request, no headers after 3 attempts", never.URL,
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{\"stream\":true}",
			http.StatusGatewayTimeout, "upstream response timeout after 100ms (3 attempts)",
			http.Header{"X-Should-Retry": {"false"}}},
		{"non-streaming message, no headers within x-stainless-timeout", never.URL,
			"POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Stainless-Timeout: 1.2\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
			http.StatusGatewayTimeout, "upstream response timeout: no response headers within the client's 1.2s timeout (1 attempt)",
			http.Header{"X-Should-Retry": {"false"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(t, tt.upstream)
			cfg.Timeout = 100 * time.Millisecond
			cfg.MaxBodyBytes = 16
			p := startProxy(t, cfg, testTuning)
			res := rawRequest(t, p.addr, tt.request)
			got, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode != tt.status {
				t.Fatalf("status = %d; want %d (body %q)", res.StatusCode, tt.status, got)
			}
			id := p.logs.waitRequests(t, 1)[0]["request_id"].(string)
			want := `{"type":"error","error":{"type":"` + proxyErrorType(tt.status) + `","message":"` + tt.message +
				`","request_id":"` + id + `"}}` + "\n"
			if diff := cmp.Diff(want, string(got)); diff != "" {
				t.Errorf("body (-want +got):\n%s", diff)
			}
			wantHeader := http.Header{}
			for k, v := range tt.header {
				wantHeader[k] = v
			}
			wantHeader.Set("Content-Type", "application/json")
			wantHeader.Set("Content-Length", strconv.Itoa(len(want)))
			wantHeader.Set("Request-Id", id)
			res.Header.Del("Date")
			if diff := cmp.Diff(wantHeader, res.Header); diff != "" {
				t.Errorf("header (-want +got):\n%s", diff)
			}
		})
	}
}

// The final record: request IDs, and nothing left behind.

func TestRequestIDsAreUnique(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := newRequestID()
		if !isRequestID(id) || seen[id] {
			t.Fatalf("bad or repeated request id %q", id)
		}
		seen[id] = true
	}
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
				time.Sleep(time.Millisecond) // the upstream's own pace: a stream, not one write
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
	eventually(20*time.Millisecond, func() bool {
		tr.CloseIdleConnections()
		p.srv.transport.CloseIdleConnections()
		g, fd = runtime.NumGoroutine(), openFDs(t)
		return g <= baseG+slack && fd <= baseFD+slack
	})
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
