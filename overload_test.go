package main

import (
	"net/http"
	"runtime/debug"
	"testing"
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
	if got, want := newMemoryGuard(0).limit, int64(75<<20); got != want {
		t.Errorf("limit with GOMEMLIMIT=100MiB: %d; want %d (three quarters)", got, want)
	}
	debug.SetMemoryLimit(1<<63 - 1) // no limit, as when GOMEMLIMIT is not set
	if g := newMemoryGuard(0); g.limit != 0 || g.overloaded() {
		t.Errorf("without GOMEMLIMIT: limit %d, overloaded %v; want neither", g.limit, g.overloaded())
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
