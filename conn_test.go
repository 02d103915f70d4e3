package main

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestClientThatStopsReadingIsCut(t *testing.T) {
	// 64 MiB is far more than the loopback socket buffers hold: the
	// proxy's writes block once the client stops reading.
	up, upstreamDone := bigUpstream(t, 64<<20)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 300 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	stopReading(t, p.url+"/v1/files/big")
	// The client reads no more. The request ends on its own.
	l := p.logs.waitRequests(t, 1)[0]
	if msg, _ := l["error"].(string); l["status"] != float64(499) || !strings.HasPrefix(msg, "client stopped reading") {
		t.Errorf("log line = %v; want status 499 and the error saying the client stopped reading", l)
	}
	select {
	case <-upstreamDone:
	case <-time.After(5 * time.Second):
		t.Error("the upstream request was not cancelled")
	}
	checkMetrics(t, p, map[string]string{
		`proxy_refused_total{reason="client_stopped_reading"}`: "1",
		`proxy_requests_total{status="499",method="GET"}`:      "1",
		`proxy_requests_in_flight`:                             "0",
	})
	if p.srv.metrics.errorsTotal() != 0 {
		t.Error("a client that stopped reading was counted as a proxy error")
	}
}

func TestSlowReaderIsNotCut(t *testing.T) {
	// A client that reads in bursts, with pauses, is slow, not gone; nor
	// is the upstream idle while the proxy's writes wait for it. (The
	// kernel lets a blocked write go on once the client has read enough
	// to empty half of the socket's send buffer, which grows up to
	// several MiB: a few bursts.)
	const size = 8 << 20
	up, _ := bigUpstream(t, size)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = time.Second
	p := startProxy(t, cfg, testTuning)
	res, err := testClient(t).Get(p.url + "/v1/files/big")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	total := 0
	buf := make([]byte, 512<<10)
	for {
		n, err := io.ReadFull(res.Body, buf)
		total += n
		if err != nil {
			break
		}
		time.Sleep(cfg.Timeout / 8) // the client's own pace
	}
	if total != size {
		t.Fatalf("read %d bytes; want all %d", total, size)
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["error"] != nil || l["status"] != float64(200) {
		t.Errorf("log line = %v; want status 200 and no error", l)
	}
}

func TestConnectionBound(t *testing.T) {
	u := newEchoUpstream(t)
	cfg := testConfig(t, u.URL)
	cfg.MaxConnections = 2 // a bound of 4 connections
	p := startProxy(t, cfg, testTuning)
	bound := int(connBound(cfg))
	dial := func() net.Conn {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	for range bound {
		dial() // idle keep-alive connections count
	}
	waitGauge(t, &p.srv.metrics.clientConns, int64(bound))

	// Past the bound, a connection is still served, briefly: probes and
	// scrapes answer, proxied requests are refused.
	over := dial()
	io.WriteString(over, "GET /health HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
	br := bufio.NewReader(over)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	if res.StatusCode != 200 {
		t.Errorf("/health past the bound: %d; want 200", res.StatusCode)
	}
	res, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusServiceUnavailable)
	if e.Error.Message != "proxy overloaded: too many client connections, retry later" || !res.Close {
		t.Errorf("message %q, close %v; want the connection refusal, and the connection closed", e.Error.Message, res.Close)
	}
	if u.hits.Load() != 0 {
		t.Error("a request past the bound reached the upstream")
	}

	// Past the bound and the overflow, a connection is closed at once.
	waitGauge(t, &p.srv.metrics.clientConns, int64(bound)) // the refused one was closed
	for range overflowConns {
		dial()
	}
	waitGauge(t, &p.srv.metrics.clientConns, int64(bound+overflowConns))
	last := dial()
	last.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := last.Read(make([]byte, 1)); err == nil {
		t.Errorf("a connection past the overflow read %d bytes; want it closed", n)
	}
	waitGauge(t, &p.srv.metrics.clientConns, int64(bound+overflowConns))
	// (Read directly: a scrape would need a connection.)
	if n := p.srv.metrics.refused[refuseTooManyConns].Load(); n != 2 {
		t.Errorf("refused too_many_connections = %d; want 2", n)
	}
}

// TestGhostRequestsAreNeverForwarded repeats, many times, a request whose
// client leaves while it waits — for a slot, or for room for its body —
// and requires that none of them reaches the upstream.
func TestGhostRequestsAreNeverForwarded(t *testing.T) {
	const trials = 30
	tests := []struct {
		name   string
		holder string // a request that fills the slot or the budget
		ghost  string // sent whole, then the client closes
		wait   waitKind
	}{
		{"POST waiting for a slot", "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n",
			"POST /ghost HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", waitSlot},
		{"chunked POST waiting for a slot", "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n",
			"POST /ghost HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", waitSlot},
		{"GET waiting for a slot", "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n",
			"GET /ghost HTTP/1.1\r\nHost: x\r\n\r\n", waitSlot},
		{"POST waiting for body budget",
			"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 737280\r\n\r\n" + strings.Repeat("h", 720<<10),
			"POST /ghost HTTP/1.1\r\nHost: x\r\nContent-Length: 409600\r\n\r\n" + strings.Repeat("g", 400<<10), waitBodyBudget},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ghosts atomic.Int64
			entered := make(chan struct{})
			release := make(chan struct{})
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				if r.URL.Path == "/ghost" {
					ghosts.Add(1)
					return
				}
				entered <- struct{}{}
				select {
				case <-release:
				case <-r.Context().Done():
				}
			}))
			t.Cleanup(up.Close)
			cfg := testConfig(t, up.URL)
			cfg.MaxConnections = 1
			if tt.wait == waitBodyBudget {
				cfg.MaxConnections = 2
			}
			tun := testTuning
			tun.bodyBudget = 1 << 20
			p := startProxy(t, cfg, tun)
			for i := range trials {
				holder, err := net.Dial("tcp", p.addr)
				if err != nil {
					t.Fatal(err)
				}
				io.WriteString(holder, tt.holder)
				<-entered
				ghost, err := net.Dial("tcp", p.addr)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := io.WriteString(ghost, tt.ghost); err != nil {
					t.Fatal(err)
				}
				waitGauge(t, &p.srv.metrics.waiting[tt.wait], 1)
				ghost.Close()
				release <- struct{}{}
				holder.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := http.ReadResponse(bufio.NewReader(holder), nil); err != nil {
					t.Fatalf("trial %d: holder: %v", i, err)
				}
				holder.Close()
				p.logs.waitRequests(t, 2*(i+1))
			}
			if n := ghosts.Load(); n != 0 {
				t.Errorf("%d of %d ghost requests reached the upstream", n, trials)
			}
			if got := metricValue(metricsText(t, p), `proxy_requests_total{status="499",method="`+tt.ghost[:strings.IndexByte(tt.ghost, ' ')]+`"}`); got != strconv.Itoa(trials) {
				t.Errorf("499s counted %s; want %d", got, trials)
			}
		})
	}
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
	waitGauge(t, &p.srv.metrics.waiting[waitSlot], 1)
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
