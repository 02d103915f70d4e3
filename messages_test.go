package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// streamCases are Messages request bodies and whether the proxy must treat
// them as streaming. They also seed FuzzStreamRequested.
var streamCases = []struct {
	name   string
	body   string
	stream bool
}{
	{"stream true", `{"stream":true}`, true},
	{"stream true among other keys", `{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[]}`, true},
	{"white space everywhere", " \r\n\t{ \"stream\" \n:\ttrue } \n", true},
	{"stream false", `{"model":"m","stream":false}`, false},
	{"no stream key", `{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}`, false},
	{"empty object", `{}`, false},
	{"stream true nested in content", `{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi","stream":true}]}]}`, false},
	{"stream true nested in an object", `{"metadata":{"stream":true},"stream":false}`, false},
	{"stream true inside a string", `{"system":"reply with \"stream\": true","max_tokens":1}`, false},
	{"brackets inside strings", `{"system":"}]}]{[","stream":true}`, true},
	{"escaped backslash before a quote", `{"a":"\\","stream":true}`, true},
	{"escaped quote then stream text", `{"a":"\",\"stream\":true,\"b\":\"","c":1}`, false},
	{"key written with escapes", `{"str\u0065am":true}`, true},
	{"other key with escapes", `{"a\u0062":true,"stream":true}`, true},
	{"key written wholly in escapes", `{"\u0073\u0074\u0072\u0065\u0061\u006d":true}`, true},
	{"last duplicate wins, false", `{"stream":true,"stream":false}`, false},
	{"last duplicate wins, true", `{"stream":false,"stream":true}`, true},
	{"stream as a string", `{"stream":"true"}`, false},
	{"stream as a number", `{"stream":1}`, false},
	{"stream null", `{"stream":null}`, false},
	{"key differs in case", `{"Stream":true}`, false},
	{"deep nesting", `{"a":[[[[{"b":[{"stream":true}]}]]]],"c":{"d":{"e":[]}}}`, false},
	// Not a JSON object: treated as streaming, as before.
	{"empty body", ``, true},
	{"not json", `model=claude`, true},
	{"array", `[{"stream":false}]`, true},
	{"truncated", `{"stream":false`, true},
	{"unterminated string", `{"stream":false,"a":"b}`, true},
	{"trailing garbage", `{"stream":false}x`, true},
	{"missing value", `{"stream":}`, true},
	{"missing colon", `{"stream" false}`, true},
	{"trailing comma", `{"stream":false,}`, true},
	{"unbalanced nesting", `{"a":[1,2}`, true},
	{"two objects", `{"stream":false}{"stream":false}`, true},
}

func TestStreamRequested(t *testing.T) {
	for _, tt := range streamCases {
		t.Run(tt.name, func(t *testing.T) {
			if got := streamRequested([]byte(tt.body)); got != tt.stream {
				t.Errorf("streamRequested(%q) = %v; want %v", tt.body, got, tt.stream)
			}
			// The body arrives in pieces: cut it in two at every byte,
			// and feed it byte by byte.
			for i := range len(tt.body) + 1 {
				var sc streamScanner
				sc.write([]byte(tt.body[:i]))
				sc.write([]byte(tt.body[i:]))
				if got := sc.streaming(); got != tt.stream {
					t.Errorf("fed as %q + %q: streaming() = %v; want %v", tt.body[:i], tt.body[i:], got, tt.stream)
				}
			}
			var sc streamScanner
			for i := range len(tt.body) {
				sc.write([]byte{tt.body[i]})
			}
			if got := sc.streaming(); got != tt.stream {
				t.Errorf("fed byte by byte: streaming() = %v; want %v", got, tt.stream)
			}
		})
	}
}

// scannedValue is a value objectScanner reported: the index of its key,
// its raw bytes and whether they are whole.
type scannedValue struct {
	Key   int
	Raw   string
	Whole bool
}

// scanValues feeds body to an objectScanner in pieces cut at cuts (byte
// offsets, ascending) and returns the values it reported.
func scanValues(body string, keys []string, limit int, cuts ...int) []scannedValue {
	var sc objectScanner
	var got []scannedValue
	prev := 0
	for _, c := range append(cuts, len(body)) {
		p := []byte(body[prev:c])
		prev = c
		for len(p) > 0 {
			n, k := sc.next(p, keys, limit)
			p = p[n:]
			if k >= 0 {
				v, whole := sc.value()
				got = append(got, scannedValue{k, string(v), whole})
			}
		}
	}
	return got
}

func TestObjectScannerValues(t *testing.T) {
	keys := []string{"model", "usage"}
	const limit = 16
	tests := []struct {
		name string
		body string
		want []scannedValue
	}{
		{"string and object", `{"model":"a\"b","usage":{"x":[1,"}"]},"n":1}`,
			[]scannedValue{{0, `"a\"b"`, true}, {1, `{"x":[1,"}"]}`, true}}},
		{"array", `{"usage":[1, [2], {}]}`, []scannedValue{{1, `[1, [2], {}]`, true}}},
		{"scalars", `{"usage":null,"model":12345}`, []scannedValue{{1, `null`, true}, {0, `12345`, true}}},
		{"white space around values", "{ \"model\" :\t\"m\" \n, \"usage\" : false }",
			[]scannedValue{{0, `"m"`, true}, {1, `false`, true}}},
		{"at the limit", `{"model":"0123456789abcd"}`, []scannedValue{{0, `"0123456789abcd"`, true}}},
		{"string beyond the limit", `{"model":"0123456789abcde","usage":{}}`,
			[]scannedValue{{0, ``, false}, {1, `{}`, true}}},
		{"object beyond the limit", `{"usage":{"input_tokens":1}}`, []scannedValue{{1, ``, false}}},
		{"scalar of twenty bytes", `{"usage":12345678901234567890}`, []scannedValue{{1, `12345678901234567890`, true}}},
		{"scalar beyond twenty bytes", `{"usage":123456789012345678901}`, []scannedValue{{1, ``, false}}},
		{"duplicates, each reported", `{"model":"a","model":"b"}`, []scannedValue{{0, `"a"`, true}, {0, `"b"`, true}}},
		{"keys written with escapes", `{"mod\u0065l":"a","\u0075\u0073\u0061\u0067\u0065":1}`,
			[]scannedValue{{0, `"a"`, true}, {1, `1`, true}}},
		{"nested keys do not count", `{"content":[{"model":"x","usage":{}}],"meta":{"model":"y"}}`, nil},
		{"keys inside strings do not count", `{"text":"\",\"model\":\"x"}`, nil},
		{"not an object", `["model","x"]`, nil},
		{"value cut off", `{"model":"abc`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The body arrives whole, cut in two at every byte, and byte by
			// byte.
			if diff := cmp.Diff(tt.want, scanValues(tt.body, keys, limit)); diff != "" {
				t.Errorf("values of %q (-want +got):\n%s", tt.body, diff)
			}
			for i := range len(tt.body) + 1 {
				if diff := cmp.Diff(tt.want, scanValues(tt.body, keys, limit, i)); diff != "" {
					t.Errorf("values of %q + %q (-want +got):\n%s", tt.body[:i], tt.body[i:], diff)
				}
			}
			var every []int
			for i := range len(tt.body) {
				every = append(every, i)
			}
			if diff := cmp.Diff(tt.want, scanValues(tt.body, keys, limit, every...)); diff != "" {
				t.Errorf("values of %q byte by byte (-want +got):\n%s", tt.body, diff)
			}
		})
	}
}

// FuzzStreamRequested checks the scanner against encoding/json: for every
// valid JSON object, the top-level "stream" decides (the last duplicate
// wins in both); a body that is not valid JSON must not panic. The body
// fed in pieces (their sizes taken from cuts) gives the same answer.
func FuzzStreamRequested(f *testing.F) {
	for _, tt := range streamCases {
		f.Add([]byte(tt.body), []byte{3, 1, 7})
	}
	f.Fuzz(func(t *testing.T, body, cuts []byte) {
		got := streamRequested(body)
		var sc streamScanner
		rest := body
		for _, c := range cuts {
			n := min(int(c), len(rest))
			sc.write(rest[:n])
			rest = rest[n:]
		}
		sc.write(rest)
		if pieces := sc.streaming(); pieces != got {
			t.Fatalf("streamRequested(%q) = %v, but %v when cut by %v", body, got, pieces, cuts)
		}
		if !json.Valid(body) {
			return
		}
		var top map[string]json.RawMessage
		if err := json.Unmarshal(body, &top); err != nil || top == nil {
			// Valid JSON but not an object (null, an array, a string…).
			if !got {
				t.Errorf("streamRequested(%q) = false for JSON that is not an object", body)
			}
			return
		}
		// Keys with invalid UTF-8 or lone surrogates decode to U+FFFD in
		// encoding/json and are never "stream" in either reading.
		want := string(bytes.TrimSpace(top["stream"])) == "true"
		if got != want {
			t.Errorf("streamRequested(%q) = %v; encoding/json says stream is %v", body, got, want)
		}
	})
}

func TestClientWait(t *testing.T) {
	tests := []struct {
		name  string
		value string // x-stainless-timeout; "" for none
		want  time.Duration
	}{
		{"absent", "", 600 * time.Second},
		{"SDK default", "600", 600 * time.Second},
		{"Python float", "600.0", 600 * time.Second},
		{"fraction", "0.25", 250 * time.Millisecond},
		{"an hour", "3600", time.Hour},
		{"beyond a day", "1e12", 24 * time.Hour},
		{"infinity", "Inf", 24 * time.Hour},
		{"zero", "0", 600 * time.Second},
		{"negative", "-5", 600 * time.Second},
		{"not a number", "ten", 600 * time.Second},
		{"NaN", "NaN", 600 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.value != "" {
				h.Set("X-Stainless-Timeout", tt.value)
			}
			if got := clientWait(h); got != tt.want {
				t.Errorf("clientWait(x-stainless-timeout: %q) = %v; want %v", tt.value, got, tt.want)
			}
		})
	}
}

func TestNonStreamingMessageOutlivesTimeout(t *testing.T) {
	// The API sends a non-streaming answer's headers only once it is
	// generated: a call slower than timeout_secs must wait for it, once,
	// not be generated three times and still fail.
	up, hits := countingUpstream(t, 600*time.Millisecond)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 200 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	body := `{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text","text":"hi","stream":true}]}]}`
	req, _ := http.NewRequest("POST", p.url+"/v1/messages?beta=true", strings.NewReader(body))
	req.Header.Set("X-Stainless-Timeout", "600")
	res, err := testClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !strings.Contains(string(got), `"text":"done"`) {
		t.Fatalf("status %d, body %q; want 200 and the upstream's answer", res.StatusCode, got)
	}
	if n := hits.Load(); n != 1 {
		t.Errorf("upstream generated the answer %d times; want 1", n)
	}
	if l := p.logs.waitRequests(t, 1)[0]; l["attempts"] != float64(1) || l["status"] != float64(200) {
		t.Errorf("log line = %v; want status 200 after 1 attempt", l)
	}
}

func TestPhase2TimeoutAndAttempts(t *testing.T) {
	// An upstream that never answers: how long each request waits for
	// headers, and how many attempts it gets, depends on what it is.
	const timeout = 150 * time.Millisecond
	tests := []struct {
		name     string
		method   string
		path     string
		body     string
		wait     string // x-stainless-timeout; "" for none
		message  string
		attempts int64
		least    time.Duration // the answer comes no sooner
	}{
		{"streaming message", "POST", "/v1/messages", `{"stream":true,"messages":[]}`, "1.4",
			"upstream response timeout after 150ms (3 attempts)", 3, 3 * timeout},
		{"non-streaming message waits until just before its client gives up", "POST", "/v1/messages?beta=true",
			`{"messages":[{"role":"user","content":[{"type":"text","text":"x","stream":true}]}]}`, "1.4",
			"upstream response timeout: no response headers within the client's 1.4s timeout (1 attempt)", 1, 400 * time.Millisecond},
		{"non-streaming message, never below timeout_secs", "POST", "/v1/messages", `{"stream":false}`, "1.01",
			"upstream response timeout after 150ms (1 attempt)", 1, timeout},
		{"unparsable body counts as streaming", "POST", "/v1/messages", `{"stream":false`, "1.4",
			"upstream response timeout after 150ms (3 attempts)", 3, 3 * timeout},
		{"token counting is not a Messages call", "POST", "/v1/messages/count_tokens", `{"messages":[]}`, "1.4",
			"upstream response timeout after 150ms (3 attempts)", 3, 3 * timeout},
		{"batches are not a Messages call", "POST", "/v1/messages/batches", `{"requests":[]}`, "1.4",
			"upstream response timeout after 150ms (3 attempts)", 3, 3 * timeout},
		{"GET is not a Messages call", "GET", "/v1/messages", "", "1.4",
			"upstream response timeout after 150ms (3 attempts)", 3, 3 * timeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			up, hits := countingUpstream(t, -1)
			cfg := testConfig(t, up.URL)
			cfg.Timeout = timeout
			p := startProxy(t, cfg, testTuning)
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			req, _ := http.NewRequest(tt.method, p.url+tt.path, body)
			if tt.wait != "" {
				req.Header.Set("X-Stainless-Timeout", tt.wait)
			}
			start := time.Now()
			res, err := testClient(t).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			elapsed := time.Since(start)
			e := readError(t, res, http.StatusGatewayTimeout)
			if e.Error.Message != tt.message {
				t.Errorf("message = %q; want %q", e.Error.Message, tt.message)
			}
			if got := res.Header.Get("X-Should-Retry"); got != "false" {
				t.Errorf("x-should-retry = %q; want false", got)
			}
			if n := hits.Load(); n != tt.attempts {
				t.Errorf("upstream saw %d attempts; want %d", n, tt.attempts)
			}
			// A timer never fires early.
			if elapsed < tt.least {
				t.Errorf("answered after %v; want at least %v", elapsed, tt.least)
			}
			if l := p.logs.waitRequests(t, 1)[0]; l["attempts"] != float64(tt.attempts) || l["status"] != float64(504) {
				t.Errorf("log line = %v; want status 504 after %d attempts", l, tt.attempts)
			}
			checkMetrics(t, p, map[string]string{`proxy_upstream_errors_total{error_type="timeout"}`: "1"})
		})
	}
}

// messagesBody returns a Messages request body of about size bytes, shaped
// like Claude Code's: a long conversation with escapes in its text, and
// "stream": true as the last key, so the scanner must cross all of it.
func messagesBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"model":"claude-sonnet-4-5","max_tokens":32000,"system":[{"type":"text","text":"You are Claude Code.\n"}],"messages":[`)
	turn := `{"role":"user","content":[{"type":"text","text":"Here is main.go:\n\tfunc main() {\n\t\tfmt.Println(\"hello, \\\"world\\\"\")\n\t}\n` +
		strings.Repeat("lorem ipsum dolor sit amet ", 20) + `"},{"type":"tool_result","tool_use_id":"toolu_01","content":[{"type":"text","text":"ok","stream":true}]}]},`
	for b.Len() < size {
		b.WriteString(turn)
	}
	b.WriteString(`{"role":"user","content":"go on"}],"tools":[],"stream":true}`)
	return b.Bytes()
}

func TestMessagesBodyIsStreaming(t *testing.T) {
	body := messagesBody(1 << 20)
	if !json.Valid(body) || !streamRequested(body) {
		t.Fatal("the benchmark body is not a valid streaming request")
	}
	i := bytes.LastIndex(body, []byte(`"stream":true}`))
	nonStream := append(body[:i:i], `"stream":false}`...)
	if streamRequested(nonStream) {
		t.Fatal("a body whose top-level stream is false counts as streaming")
	}
}

// BenchmarkStreamRequested measures the scan of a 1 MiB Messages body that
// every POST /v1/messages pays, beside two encoding/json baselines in the
// same run: validating the body, and decoding only its "stream" field.
func BenchmarkStreamRequested(b *testing.B) {
	body := messagesBody(1 << 20)
	b.Run("scan", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			if !streamRequested(body) {
				b.Fatal("not streaming")
			}
		}
	})
	b.Run("json.Valid", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			if !json.Valid(body) {
				b.Fatal("invalid")
			}
		}
	})
	b.Run("json.Unmarshal", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			var v struct {
				Stream bool `json:"stream"`
			}
			if err := json.Unmarshal(body, &v); err != nil || !v.Stream {
				b.Fatal("not streaming")
			}
		}
	})
}

// TestSoughtKeysFit: every key list the scanners look for fits
// objectScanner's key buffer; a longer key would never match.
func TestSoughtKeysFit(t *testing.T) {
	for _, keys := range [][]string{streamKey, usageKeys, usageKeysByType, dataKeys, messageKeys} {
		for _, k := range keys {
			if len(k) > maxSoughtKey {
				t.Errorf("key %q is %d bytes, more than maxSoughtKey %d", k, len(k), maxSoughtKey)
			}
		}
	}
}
