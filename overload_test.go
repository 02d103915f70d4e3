package main

import (
	"net/http"
	"runtime/debug"
	"strings"
	"testing"
	"time"
)

func TestMemoryGuard(t *testing.T) {
	never := newMemoryGuard(1 << 50)
	if never.overloaded() {
		t.Fatal("overloaded with a limit of a PiB")
	}
	pressure := never.last.Load()
	if pressure <= 0 {
		t.Fatalf("sampled pressure %d; want the process's memory", pressure)
	}
	if !newMemoryGuard(pressure / 2).overloaded() {
		t.Errorf("not overloaded at twice its limit (pressure %d)", pressure)
	}
}

func TestMemoryGuardFollowsGOMEMLIMIT(t *testing.T) {
	old := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(old) })
	debug.SetMemoryLimit(100 << 20)
	if got, want := newMemoryGuard(0).limit.Load(), int64(75<<20); got != want {
		t.Errorf("limit with GOMEMLIMIT=100MiB: %d; want %d (three quarters)", got, want)
	}
	debug.SetMemoryLimit(1<<63 - 1) // no limit, as when GOMEMLIMIT is not set
	if g := newMemoryGuard(0); g.limit.Load() != 0 || g.overloaded() {
		t.Errorf("without GOMEMLIMIT: limit %d, overloaded %v; want neither", g.limit.Load(), g.overloaded())
	}
}

func TestOverloadedProxyRefusesWithRetryAfter(t *testing.T) {
	u := newEchoUpstream(t)
	tun := testTuning
	tun.overloadAt = 1 // always over
	p := startProxy(t, testConfig(t, u.URL), tun)
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusServiceUnavailable)
	if e.Error.Message != "proxy overloaded: memory near its limit, retry later" || res.Header.Get("Retry-After") != retryAfter {
		t.Errorf("message %q, Retry-After %q; want the overload refusal and %s", e.Error.Message, res.Header.Get("Retry-After"), retryAfter)
	}
	if u.hits.Load() != 0 {
		t.Error("a refused request reached the upstream")
	}
	// Probes and scrapes still answer.
	for _, path := range []string{"/health", "/metrics"} {
		res, err := testClient(t).Get(p.url + path)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			t.Errorf("GET %s while overloaded: %d; want 200", path, res.StatusCode)
		}
	}
	p.logs.waitRequests(t, 1)
	checkMetrics(t, p, map[string]string{
		`proxy_refused_total{reason="overloaded"}`:             "1",
		`proxy_upstream_errors_total{error_type="overloaded"}`: "1",
		`proxy_requests_total{status="503",method="POST"}`:     "1",
	})
}

func TestOverloadCutsResponsesNotReadAndRefusesWaiters(t *testing.T) {
	// While memory is near its limit, the buffers of responses nobody reads
	// are what grows: they are cut long before timeout_secs; and requests
	// waiting for a slot give up with 503.
	up, upstreamDone := bigUpstream(t, 64<<20)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = time.Minute
	cfg.MaxConnections = 1
	p := startProxy(t, cfg, testTuning)
	stopReading(t, p.url+"/v1/files/big")
	waiter := make(chan *http.Response, 1)
	go func() {
		res, err := testClient(t).Get(p.url + "/v1/models")
		if err == nil {
			waiter <- res
		}
	}()
	waitGauge(t, &p.srv.metrics.waiting[waitSlot], 1)

	p.srv.guard.limit.Store(1) // memory is now "near its limit"
	if !p.srv.guard.sample() {
		t.Fatal("the guard did not start acting")
	}
	// A response is cut once its write has been blocked for shedAfter:
	// shed, as the guard's loop does, until the proxy logs a response cut.
	cut := func() bool {
		p.ln.shed()
		for _, l := range p.logs.lines(t) {
			if n, _ := l["responses_cut"].(float64); n > 0 {
				return true
			}
		}
		return false
	}
	if !eventually(shedAfter/5, cut) {
		t.Fatal("no response was cut: the one nobody reads was not found blocked")
	}
	select {
	case res := <-waiter:
		readError(t, res, http.StatusServiceUnavailable)
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting request was not refused")
	}
	select {
	case <-upstreamDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the response nobody reads was not cut")
	}
	for _, l := range p.logs.waitRequests(t, 2) {
		if l["path"] == "/v1/files/big" && (l["status"] != float64(499) || !strings.HasPrefix(l["error"].(string), "client stopped reading")) {
			t.Errorf("log line = %v; want 499, client stopped reading", l)
		}
	}
}
