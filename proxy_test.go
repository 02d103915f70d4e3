package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

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

func TestBodyLimit(t *testing.T) {
	const limit = 10 << 20
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	c := testClient(t)
	exact := bytes.Repeat([]byte("a"), limit)

	for _, chunked := range []bool{false, true} {
		name := "content-length"
		if chunked {
			name = "chunked"
		}
		t.Run(name+"/exact limit passes", func(t *testing.T) {
			res, err := c.Do(bodyRequest(t, p.url, exact, chunked))
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			_, got := u.request()
			if res.StatusCode != 200 || !bytes.Equal(got, exact) {
				t.Fatalf("status %d, upstream got %d bytes; want 200 and all %d\n%s", res.StatusCode, len(got), limit, p.logs.String())
			}
		})
		t.Run(name+"/one byte more is refused", func(t *testing.T) {
			before := u.hits.Load()
			res, err := c.Do(bodyRequest(t, p.url, append(exact, 'b'), chunked))
			if err != nil {
				t.Fatal(err)
			}
			e := readError(t, res, http.StatusRequestEntityTooLarge)
			if e.Error.Message != "request body exceeds 10485760 bytes" {
				t.Errorf("message = %q", e.Error.Message)
			}
			if u.hits.Load() != before {
				t.Error("the upstream was contacted")
			}
		})
	}
	p.logs.waitRequests(t, 4)
	m := metricsText(t, p)
	if got := metricValue(m, `proxy_upstream_errors_total{error_type="invalid_request"}`); got != "2" {
		t.Errorf("invalid_request errors = %q; want 2", got)
	}
	if got := metricValue(m, `proxy_requests_total{status="413",method="POST"}`); got != "2" {
		t.Errorf("413s counted %q; want 2", got)
	}
}

func bodyRequest(t testing.TB, base string, body []byte, chunked bool) *http.Request {
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // hides the length: sent chunked
	}
	req, err := http.NewRequest("POST", base+"/v1/messages", r)
	if err != nil {
		t.Fatal(err)
	}
	if chunked && req.ContentLength != 0 {
		t.Fatal("request is not chunked")
	}
	return req
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
			time.Sleep(100 * time.Millisecond)
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
	// The waiter's request is logged when it gives up; until then it waits.
	time.Sleep(100 * time.Millisecond)
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

func TestBodyBudgetWaitsForRoom(t *testing.T) {
	entered := make(chan string, 4)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		entered <- r.URL.Path
		<-release
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.MaxBodyBytes = 1 << 20
	tun := testTuning
	tun.bodyBudget = 1 << 20 // room for one body at a time, with the reserve for first chunks
	p := startProxy(t, cfg, tun)
	c := testClient(t)
	body := bytes.Repeat([]byte("x"), 600<<10)
	done := make(chan int, 2)
	post := func(path string) {
		res, err := c.Post(p.url+path, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			done <- 0
			return
		}
		res.Body.Close()
		done <- res.StatusCode
	}
	next := func() string {
		select {
		case got := <-entered:
			return got
		case <-time.After(10 * time.Second):
			t.Fatal("no request reached the upstream: is the budget leaking?")
			return ""
		}
	}
	go post("/first")
	if got := next(); got != "/first" {
		t.Fatalf("upstream got %s first", got)
	}
	go post("/second")
	select {
	case got := <-entered:
		t.Fatalf("%s reached the upstream while the budget was full", got)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if got := next(); got != "/second" {
		t.Fatalf("upstream got %s; want /second once room was freed", got)
	}
	for range 2 {
		if code := <-done; code != 200 {
			t.Errorf("status %d; want 200", code)
		}
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

// A request's body is needed only until its response headers arrive (no
// attempt follows), so a long stream does not hold its share of the budget.
func TestBodyBudgetReleasedOnceHeadersArrive(t *testing.T) {
	entered := make(chan string, 2)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: started\n\n")
		w.(http.Flusher).Flush()
		entered <- r.URL.Path
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() { close(release) })
	cfg := testConfig(t, up.URL)
	cfg.MaxBodyBytes = 1 << 20
	cfg.Timeout = time.Minute // the first stream stays open, silent, throughout
	tun := testTuning
	tun.bodyBudget = 1 << 20 // room for one body at a time, with the reserve for first chunks
	p := startProxy(t, cfg, tun)
	c := testClient(t)
	body := bytes.Repeat([]byte("x"), 600<<10)
	for _, path := range []string{"/first", "/second"} {
		res, err := c.Post(p.url+path, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		select {
		case got := <-entered:
			if got != path {
				t.Fatalf("upstream got %s; want %s", got, path)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s never reached the upstream: the first stream still holds the body budget", path)
		}
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
