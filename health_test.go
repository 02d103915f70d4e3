package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
)

// healthBody mirrors the /health JSON; pointers tell a missing field from a zero one.
type healthBody struct {
	Status         *string `json:"status"`
	UptimeSeconds  *int64  `json:"uptime_seconds"`
	RequestsServed *uint64 `json:"requests_served"`
	ErrorsTotal    *uint64 `json:"errors_total"`
}

// getHealth sends method to the health handler over a loopback server and
// returns the response with its body read.
func getHealth(t testing.TB, h http.Handler, method string) (*http.Response, []byte) {
	t.Helper()
	srv := httptest.NewServer(h) // listens on 127.0.0.1:0
	t.Cleanup(srv.Close)
	req, err := http.NewRequestWithContext(t.Context(), method, srv.URL+"/health", nil)
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
	return resp, body
}

func TestHealth(t *testing.T) {
	m := newMetrics()
	m.observe("POST", 200, 300*time.Millisecond)
	m.observe("POST", 200, 2*time.Second)
	m.observe("GET", 404, time.Millisecond)
	m.observe("POST", 502, 5*time.Second)
	m.observe("POST", 499, time.Second) // a client that left is served, not an error
	m.upstreamError(errTypeConnection)
	const uptime = 90 // seconds the handler has been up when the test starts
	before := time.Now()
	start := before.Add(-uptime * time.Second)

	resp, body := getHealth(t, healthHandler(m, start), http.MethodGet)
	elapsed := time.Since(before)

	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /health status = %d; want 200", resp.StatusCode)
	}
	if got := resp.Header.Get("Content-Type"); got != "application/json" {
		t.Errorf("GET /health Content-Type = %q; want %q", got, "application/json")
	}
	if got, want := resp.Header.Get("Content-Length"), strconv.Itoa(len(body)); got != want {
		t.Errorf("GET /health Content-Length = %q; want %q", got, want)
	}

	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var got healthBody
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
	if err := dec.Decode(new(any)); !errors.Is(err, io.EOF) {
		t.Errorf("after the object in %q: Decode = %v; want io.EOF", body, err)
	}
	if got.Status == nil || got.UptimeSeconds == nil || got.RequestsServed == nil || got.ErrorsTotal == nil {
		t.Fatalf("GET /health body %q lacks one of status, uptime_seconds, requests_served, errors_total", body)
	}
	if *got.UptimeSeconds < uptime || *got.UptimeSeconds > uptime+int64(elapsed/time.Second) {
		t.Errorf("uptime_seconds = %d; want %d (+%v of test time)", *got.UptimeSeconds, uptime, elapsed)
	}
	type fields struct {
		Status                      string
		RequestsServed, ErrorsTotal uint64
	}
	want := fields{"healthy", 5, 1}
	if diff := cmp.Diff(want, fields{*got.Status, *got.RequestsServed, *got.ErrorsTotal}); diff != "" {
		t.Errorf("GET /health fields (-want +got):\n%s", diff)
	}
}

func TestHealthHEAD(t *testing.T) {
	m := newMetrics()
	h := healthHandler(m, time.Now())
	_, getBody := getHealth(t, h, http.MethodGet)
	resp, body := getHealth(t, h, http.MethodHead)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("HEAD /health status = %d; want 200", resp.StatusCode)
	}
	if got := resp.Header.Get("Content-Type"); got != "application/json" {
		t.Errorf("HEAD /health Content-Type = %q; want %q", got, "application/json")
	}
	if got, want := resp.Header.Get("Content-Length"), strconv.Itoa(len(getBody)); got != want {
		t.Errorf("HEAD /health Content-Length = %q; want %q (the GET length)", got, want)
	}
	if len(body) != 0 {
		t.Errorf("HEAD /health body = %q; want none", body)
	}
}

// TestHealthBody pins the exact bytes, with a fake clock for the uptime:
// whole seconds, truncated.
func TestHealthBody(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := newMetrics()
		for range 3 {
			m.observe("POST", 200, time.Second)
		}
		m.observe("POST", 504, time.Minute)
		m.upstreamError(errTypeTimeout)
		h := healthHandler(m, time.Now())
		time.Sleep(90*time.Second + 999*time.Millisecond) // the bubble's fake clock: 90.999 s of uptime, at once

		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), http.MethodGet, "/health", nil))
		want := `{"status":"healthy","uptime_seconds":90,"requests_served":4,"errors_total":1}` + "\n"
		if got := rec.Body.String(); got != want {
			t.Errorf("GET /health body = %q; want %q", got, want)
		}
	})
}
