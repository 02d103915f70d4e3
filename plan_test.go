package main

import (
	"bytes"
	"compress/gzip"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// A Claude Max organization's rate-limit headers, as the API sends them on
// every response.
var maxHeaders = map[string]string{
	"Anthropic-Organization-Id":                        "4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10",
	"Anthropic-Ratelimit-Unified-Status":               "allowed",
	"Anthropic-Ratelimit-Unified-5h-Status":            "allowed",
	"Anthropic-Ratelimit-Unified-5h-Utilization":       "0.31",
	"Anthropic-Ratelimit-Unified-5h-Reset":             "1764500400",
	"Anthropic-Ratelimit-Unified-7d-Status":            "allowed",
	"Anthropic-Ratelimit-Unified-7d-Utilization":       "0.72",
	"Anthropic-Ratelimit-Unified-7d-Reset":             "1764900000",
	"Anthropic-Ratelimit-Unified-Representative-Claim": "five_hour",
	"Anthropic-Ratelimit-Unified-Fallback-Percentage":  "0.5",
	"Anthropic-Ratelimit-Unified-Reset":                "1764500400",
	"Request-Id":                                       "req_011CV",
}

// sseEvents is a streamed Messages response as the API sends it. The text
// deltas hold what a careless scanner would take for usage.
var sseEvents = []string{
	"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":1200,\"cache_read_input_tokens\":3000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":1200,\"ephemeral_1h_input_tokens\":0},\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n",
	"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
	"event: ping\ndata: {\"type\": \"ping\"}\n\n",
	"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"event: message_delta\\ndata: {\\\"usage\\\":{\\\"output_tokens\\\":999}}\"}}\n\n",
	"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" \\\"model\\\": \\\"fake\\\"\"}}\n\n",
	"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
	"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":1200,\"cache_read_input_tokens\":3000,\"output_tokens\":15}}\n\n",
	"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
}

// messageJSON is a non-streamed Messages response; the tool input holds a
// nested "usage" and "model" that are not the response's.
const messageJSON = `{"id":"msg_02","type":"message","role":"assistant","model":"claude-haiku-4-5-20251001",` +
	`"content":[{"type":"tool_use","id":"toolu_1","name":"record","input":{"model":"gpt","usage":{"input_tokens":7777}}}],` +
	`"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,` +
	`"cache_read_input_tokens":0,"output_tokens":40,"service_tier":"standard"}}`

// anthropicUpstream answers like the API: rate-limit headers on every
// response, and a Messages response streamed in pieces cut at awkward
// places (inside "data:", inside a JSON string, between \n and \n), each
// flushed on its own. ?gzip=1 encodes the body; /v1/messages/count_tokens
// answers JSON with input_tokens that are not usage; a body asking for
// status 429 gets the API's rate-limit error.
func anthropicUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		for k, v := range maxHeaders {
			w.Header().Set(k, v)
		}
		var out io.Writer = w
		flush := func() { w.(http.Flusher).Flush() }
		if r.URL.Query().Get("gzip") == "1" {
			w.Header().Set("Content-Encoding", "gzip")
			zw := gzip.NewWriter(w)
			defer zw.Close()
			out = zw
			flush = func() { zw.Flush(); w.(http.Flusher).Flush() }
		}
		switch {
		case r.URL.Path == "/v1/messages/count_tokens":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(out, `{"input_tokens":99}`)
		case bytes.Contains(body, []byte(`"status":429`)):
			w.Header().Set("Anthropic-Ratelimit-Unified-Status", "rejected")
			w.Header().Set("Anthropic-Ratelimit-Unified-5h-Utilization", "1.02")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(out, `{"type":"error","error":{"type":"rate_limit_error","message":"limit"},"usage":{"input_tokens":5}}`)
		case bytes.Contains(body, []byte(`"stream":true`)):
			w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
			all := strings.Join(sseEvents, "")
			for _, cut := range splitPoints(all) {
				io.WriteString(out, cut)
				flush()
			}
		default:
			w.Header().Set("Content-Type", "application/json")
			for i := 0; i < len(messageJSON); i += 7 {
				io.WriteString(out, messageJSON[i:min(i+7, len(messageJSON))])
				flush()
			}
		}
	}))
	t.Cleanup(up.Close)
	return up
}

// splitPoints cuts s into pieces ending inside every "data:", just after
// every '\n', and in the middle of each event.
func splitPoints(s string) []string {
	var out []string
	for s != "" {
		n := len(s)
		switch i := strings.Index(s, "data:"); {
		case i > 0:
			n = i + 3 // "dat" | "a: ..."
		case strings.IndexByte(s, '\n') >= 0:
			n = strings.IndexByte(s, '\n') + 1
		}
		if n > 40 {
			n /= 2
		}
		out = append(out, s[:n])
		s = s[n:]
	}
	return out
}

// post sends a Messages request through the proxy and returns the body the
// client got, as sent on the wire.
func post(t *testing.T, p *testProxy, path, body string) (*http.Response, []byte) {
	t.Helper()
	res, err := testClient(t).Post(p.url+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return res, got
}

func TestPlanUsageThroughTheProxy(t *testing.T) {
	up := anthropicUpstream(t)
	p := startProxy(t, testConfig(t, up.URL), testTuning)

	// A streamed call: its events reach the client byte for byte.
	res, got := post(t, p, "/v1/messages?beta=true", `{"model":"claude-sonnet-4-5","stream":true,"messages":[]}`)
	if want := strings.Join(sseEvents, ""); string(got) != want {
		t.Fatalf("streamed body changed on its way:\n%s", cmp.Diff(want, string(got)))
	}
	if res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	// A non-streamed call, then the same two gzip-encoded.
	post(t, p, "/v1/messages", `{"model":"claude-haiku-4-5","messages":[]}`)
	_, gz := post(t, p, "/v1/messages?gzip=1", `{"model":"claude-sonnet-4-5","stream":true,"messages":[]}`)
	if zr, err := gzip.NewReader(bytes.NewReader(gz)); err != nil {
		t.Fatalf("the client did not get the gzip body: %v", err)
	} else if plain, _ := io.ReadAll(zr); string(plain) != strings.Join(sseEvents, "") {
		t.Fatalf("gzip body changed on its way")
	}
	post(t, p, "/v1/messages?gzip=1", `{"messages":[]}`)
	// Not token usage: count_tokens, and an error.
	post(t, p, "/v1/messages/count_tokens", `{"messages":[]}`)
	post(t, p, "/v1/messages", `{"status":429}`)

	org := `organization="4b1c2a9e-0d57-4e0f-9c1b-2f6a3e8d7c10"`
	checkMetrics(t, p, map[string]string{
		`anthropic_tokens_total{` + org + `,model="claude-sonnet-4-5-20250929",type="input"}`:          "50",
		`anthropic_tokens_total{` + org + `,model="claude-sonnet-4-5-20250929",type="output"}`:         "30",
		`anthropic_tokens_total{` + org + `,model="claude-sonnet-4-5-20250929",type="cache_read"}`:     "6000",
		`anthropic_tokens_total{` + org + `,model="claude-sonnet-4-5-20250929",type="cache_creation"}`: "2400",
		`anthropic_tokens_total{` + org + `,model="claude-haiku-4-5-20251001",type="input"}`:           "24",
		`anthropic_tokens_total{` + org + `,model="claude-haiku-4-5-20251001",type="output"}`:          "80",
		`anthropic_ratelimit_unified_utilization{` + org + `,window="5h"}`:                             "1.02",
		`anthropic_ratelimit_unified_utilization{` + org + `,window="7d"}`:                             "0.72",
		`anthropic_ratelimit_unified_reset_timestamp_seconds{` + org + `,window="7d"}`:                 "1764900000",
		`anthropic_ratelimit_unified_status{` + org + `,status="allowed"}`:                             "0",
		`anthropic_ratelimit_unified_status{` + org + `,status="rejected"}`:                            "1",
		`anthropic_ratelimit_unified_representative_claim{` + org + `,claim="five_hour"}`:              "1",
		`anthropic_usage_parse_errors_total`:                                                           "0",
		`anthropic_usage_skipped_total{reason="encoding"}`:                                             "0",
	})
	text := metricsText(t, p)
	if strings.Contains(text, "7777") || strings.Contains(text, `"99"`) || strings.Contains(text, `model="gpt"`) || strings.Contains(text, `window="fallback`) {
		t.Errorf("counted what is not the responses' usage:\n%s", text)
	}

	lines := p.logs.waitRequests(t, 6)
	first := lines[0]
	if first["model"] != "claude-sonnet-4-5-20250929" || first["input_tokens"] != 25.0 || first["output_tokens"] != 15.0 {
		t.Errorf("log line of the streamed call: model %v, input_tokens %v, output_tokens %v; want claude-sonnet-4-5-20250929, 25, 15",
			first["model"], first["input_tokens"], first["output_tokens"])
	}
	for _, l := range lines[4:] {
		if _, ok := l["input_tokens"]; ok {
			t.Errorf("a response without usage logged tokens: %v", l)
		}
	}
}

// TestRateLimitHeadersStrict feeds header values one at a time: a
// malformed one is counted and leaves the gauge as it was.
func TestRateLimitHeadersStrict(t *testing.T) {
	const util = "Anthropic-Ratelimit-Unified-5h-Utilization"
	const reset = "Anthropic-Ratelimit-Unified-5h-Reset"
	const status = "Anthropic-Ratelimit-Unified-Status"
	const limit = "Anthropic-Ratelimit-Output-Tokens-Limit"
	for _, tc := range []struct {
		header, value string
		series, want  string // the series after the value, "" if absent
		parseErrors   string
	}{
		{util, "0.25", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "0.25", "0"},
		{util, "0", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "0", "0"},
		{util, "1.5", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "1.5", "0"},
		{util, "2e-1", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "0.2", "0"},
		{util, "-0.1", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "NaN", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "+Inf", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "1e999", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "0x1p-2", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{util, "25%", `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`, "", "1"},
		{reset, "1764500400", `anthropic_ratelimit_unified_reset_timestamp_seconds{organization="",window="5h"}`, "1764500400", "0"},
		{reset, "1764500400.5", `anthropic_ratelimit_unified_reset_timestamp_seconds{organization="",window="5h"}`, "", "1"},
		{reset, "2025-12-01T00:00:00Z", `anthropic_ratelimit_unified_reset_timestamp_seconds{organization="",window="5h"}`, "", "1"},
		{reset, "-1", `anthropic_ratelimit_unified_reset_timestamp_seconds{organization="",window="5h"}`, "", "1"},
		{status, "allowed_warning", `anthropic_ratelimit_unified_status{organization="",status="allowed_warning"}`, "1", "0"},
		{status, "Allowed", `anthropic_ratelimit_unified_status{organization="",status="allowed"}`, "", "1"},
		{status, "throttled", `anthropic_ratelimit_unified_status{organization="",status="throttled"}`, "", "1"},
		{limit, "80000", `anthropic_ratelimit_limit{organization="",resource="output-tokens"}`, "80000", "0"},
		{limit, "8e4", `anthropic_ratelimit_limit{organization="",resource="output-tokens"}`, "", "1"},
		{limit, "99999999999999999999", `anthropic_ratelimit_limit{organization="",resource="output-tokens"}`, "", "1"},
	} {
		t.Run(tc.header+"="+tc.value, func(t *testing.T) {
			m := newMetrics()
			m.plan.rateLimits(http.Header{tc.header: {tc.value}})
			var b bytes.Buffer
			m.writePrometheus(&b)
			if _, err := parseExposition(b.String()); err != nil {
				t.Fatal(err)
			}
			if got := metricValue(b.String(), tc.series); got != tc.want {
				t.Errorf("%s = %q; want %q", tc.series, got, tc.want)
			}
			if got := metricValue(b.String(), "anthropic_usage_parse_errors_total"); got != tc.parseErrors {
				t.Errorf("parse errors %s; want %s", got, tc.parseErrors)
			}
		})
	}

	// A malformed value keeps the previous one.
	m := newMetrics()
	m.plan.rateLimits(http.Header{util: {"0.4"}})
	m.plan.rateLimits(http.Header{util: {"lots"}})
	var b bytes.Buffer
	m.writePrometheus(&b)
	if got := metricValue(b.String(), `anthropic_ratelimit_unified_utilization{organization="",window="5h"}`); got != "0.4" {
		t.Errorf("after a malformed value, utilization %q; want the previous 0.4", got)
	}
}

// TestPlanLabelsBounded: an upstream sending a thousand distinct
// organizations, windows, resources, claims and models creates no more
// series than SPEC's bounds, and odd label values become "other".
func TestPlanLabelsBounded(t *testing.T) {
	m := newMetrics()
	for i := range 1000 {
		n := strconv.Itoa(i)
		m.plan.rateLimits(http.Header{
			"Anthropic-Organization-Id":                          {"org-" + n},
			"Anthropic-Ratelimit-Unified-W" + n + "-Utilization": {"0.5"},
			"Anthropic-Ratelimit-R" + n + "-Limit":               {"10"},
			"Anthropic-Ratelimit-Unified-Representative-Claim":   {"claim_" + n},
			"Anthropic-Ratelimit-Unified-Status":                 {"allowed"},
		})
		m.plan.addTokens("org-"+n, "model-"+n, [numTokenTypes]int64{1}, [numTokenTypes]bool{true})
	}
	m.plan.addTokens("org-0", `bad"model{}`, [numTokenTypes]int64{1}, [numTokenTypes]bool{true})
	m.plan.addTokens("org-0", strings.Repeat("m", 65), [numTokenTypes]int64{1}, [numTokenTypes]bool{true})
	var b bytes.Buffer
	m.writePrometheus(&b)
	fams, err := parseExposition(b.String())
	if err != nil {
		t.Fatal(err)
	}
	distinct := func(family, label string) map[string]bool {
		seen := map[string]bool{}
		for _, f := range fams {
			if f.name != family {
				continue
			}
			for _, s := range f.samples {
				for _, l := range s.labels {
					if l.name == label {
						seen[l.value] = true
					}
				}
			}
		}
		return seen
	}
	for _, c := range []struct {
		family, label string
		max           int
	}{
		{"anthropic_ratelimit_unified_utilization", "organization", maxOrgs + 1},
		{"anthropic_ratelimit_unified_utilization", "window", maxWindows + 1},
		{"anthropic_ratelimit_limit", "resource", maxResources + 1},
		{"anthropic_ratelimit_unified_representative_claim", "claim", maxClaims + 1},
		{"anthropic_tokens_total", "model", maxModels + 1},
		{"anthropic_tokens_total", "organization", maxOrgs + 1},
	} {
		seen := distinct(c.family, c.label)
		if len(seen) != c.max || !seen[otherLabel] {
			t.Errorf("%s{%s}: %d distinct values (other: %v); want %d including other", c.family, c.label, len(seen), seen[otherLabel], c.max)
		}
	}
	if n := strings.Count(b.String(), "\n"); n > 2000 {
		t.Errorf("%d lines of exposition after 1000 distinct upstream values", n)
	}
	if strings.Contains(b.String(), "bad") || strings.Contains(b.String(), "mmmm") {
		t.Errorf("a label value outside [A-Za-z0-9._-]{1,64} was exported")
	}
}

// TestTokenEncodings: a body in an encoding the proxy cannot read is
// passed on untouched and counted as skipped; a broken gzip body is passed
// on untouched and costs the request nothing.
func TestTokenEncodings(t *testing.T) {
	for _, tc := range []struct {
		encoding, body string
		skipped        string
	}{
		{"br", "\x1b\x00\x00 not really brotli", "1"},
		{"zstd", "\x28\xb5\x2f\xfd not really zstd", "1"},
		{"gzip", "\x1f\x8b\x08 truncated gzip", "0"},
	} {
		t.Run(tc.encoding, func(t *testing.T) {
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Content-Encoding", tc.encoding)
				io.WriteString(w, tc.body)
			}))
			defer up.Close()
			p := startProxy(t, testConfig(t, up.URL), testTuning)
			done := make(chan struct{})
			var got []byte
			go func() {
				defer close(done)
				_, got = post(t, p, "/v1/messages", `{"messages":[]}`)
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("the response never ended")
			}
			if string(got) != tc.body {
				t.Errorf("body %q; want %q untouched", got, tc.body)
			}
			checkMetrics(t, p, map[string]string{`anthropic_usage_skipped_total{reason="encoding"}`: tc.skipped})
			if strings.Contains(metricsText(t, p), "anthropic_tokens_total{") {
				t.Error("tokens counted from an unreadable body")
			}
		})
	}
}

// TestPlanCostsNoAllocation: once an organization's windows are known, the
// headers of each further response cost no allocation, and neither does
// the headers' absence.
func TestPlanCostsNoAllocation(t *testing.T) {
	h := http.Header{}
	for k, v := range maxHeaders {
		h.Set(k, v)
	}
	h.Set("Anthropic-Ratelimit-Input-Tokens-Limit", "30000")
	m := newMetrics()
	m.plan.rateLimits(h)
	if n := testing.AllocsPerRun(100, func() { m.plan.rateLimits(h) }); n != 0 {
		t.Errorf("rate-limit headers: %v allocations per response; want 0", n)
	}
	plain := http.Header{"Content-Type": {"application/json"}, "Request-Id": {"req_1"}}
	if n := testing.AllocsPerRun(100, func() { m.plan.rateLimits(plain) }); n != 0 {
		t.Errorf("no rate-limit headers: %v allocations per response; want 0", n)
	}
}

// gunzipReadings counts the goroutines decompressing a gzip body for its
// usage.
func gunzipReadings() int {
	buf := make([]byte, 1<<20)
	return strings.Count(string(buf[:runtime.Stack(buf, true)]), "startGunzip.func")
}

// TestGzipReadingEndsWithItsResponse: a gzip stream's reading ends with the
// response however it ends — read to the end, its client gone mid-stream,
// the upstream reset, or the stream idle past timeout_secs — and counts
// the tokens known by then: message_start's input is billed even when the
// client leaves.
func TestGzipReadingEndsWithItsResponse(t *testing.T) {
	for _, end := range []string{"complete", "client gone", "upstream reset", "idle"} {
		t.Run(end, func(t *testing.T) {
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.ReadAll(r.Body)
				w.Header().Set("Content-Type", "text/event-stream")
				w.Header().Set("Content-Encoding", "gzip")
				w.Header().Set("Anthropic-Organization-Id", "org1")
				zw := gzip.NewWriter(w)
				send := func(ev string) error {
					zw.Write([]byte(ev))
					zw.Flush()
					return http.NewResponseController(w).Flush()
				}
				send(sseEvents[0])
				switch end {
				case "complete":
					for _, ev := range sseEvents[1:] {
						send(ev)
					}
					zw.Close()
				case "client gone":
					for send(sseEvents[3]) == nil && r.Context().Err() == nil {
						time.Sleep(5 * time.Millisecond) // the upstream's own pace
					}
				case "upstream reset":
					c, _, _ := http.NewResponseController(w).Hijack()
					c.(*net.TCPConn).SetLinger(0)
					c.Close()
				case "idle":
					<-r.Context().Done()
				}
			}))
			defer up.Close()
			cfg := testConfig(t, up.URL)
			cfg.Timeout = 300 * time.Millisecond
			p := startProxy(t, cfg, testTuning)
			res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", strings.NewReader(`{"stream":true}`))
			if err != nil {
				t.Fatal(err)
			}
			if end == "client gone" {
				res.Body.Read(make([]byte, 64))
			} else {
				io.ReadAll(res.Body)
			}
			res.Body.Close()
			p.logs.waitRequests(t, 1)
			if !eventually(10*time.Millisecond, func() bool { return gunzipReadings() == 0 }) {
				t.Fatalf("%d gzip readings still running after the response ended", gunzipReadings())
			}
			checkMetrics(t, p, map[string]string{
				`anthropic_tokens_total{organization="org1",model="claude-sonnet-4-5-20250929",type="input"}`: "25",
			})
		})
	}
}

// TestMessageWithoutModel: a response that names no model is counted under
// model "other": only an organization may be empty.
func TestMessageWithoutModel(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"type":"message","usage":{"input_tokens":5,"output_tokens":7}}`)
	}))
	defer up.Close()
	p := startProxy(t, testConfig(t, up.URL), testTuning)
	post(t, p, "/v1/messages", `{}`)
	checkMetrics(t, p, map[string]string{
		`anthropic_tokens_total{organization="",model="other",type="input"}`:  "5",
		`anthropic_tokens_total{organization="",model="other",type="output"}`: "7",
	})
}
