package main

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// usageResult is what usageScanner.result returns, for comparing.
type usageResult struct {
	Model       string
	Tokens      [numTokenTypes]int64
	Known       [numTokenTypes]bool
	ParseErrors int
}

// counted returns a result naming model, with parseErrors, and the counts
// input, output, cache_read, cache_creation in that order: -1 for unknown.
func counted(model string, parseErrors int, counts ...int64) usageResult {
	r := usageResult{Model: model, ParseErrors: parseErrors}
	for t, n := range counts {
		if n >= 0 {
			r.Tokens[t], r.Known[t] = n, true
		}
	}
	return r
}

// scanUsage feeds body to a usageScanner in pieces cut at cuts (byte
// offsets, ascending) and returns its result.
func scanUsage(stream bool, body []byte, cuts ...int) usageResult {
	var u usageScanner
	u.init(stream)
	prev := 0
	for _, c := range append(cuts, len(body)) {
		u.write(body[prev:c])
		prev = c
	}
	var r usageResult
	r.Model, r.Tokens, r.Known, r.ParseErrors = u.result()
	return r
}

// readGzip reads the usage of a gzip-encoded body as the proxy does,
// through plan.startUsage, fed in pieces cut at cuts (positions in body).
func readGzip(stream bool, body []byte, cuts []int) usageResult {
	ct := "application/json"
	if stream {
		ct = "text/event-stream"
	}
	p := newPlan()
	u := p.startUsage(&http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {ct}, "Content-Encoding": {"gzip"}}})
	prev := 0
	for _, c := range append(cuts, len(body)) {
		if c <= len(body) && c >= prev {
			u.write(body[prev:c])
			prev = c
		}
	}
	var r usageResult
	r.Model, r.Tokens, r.Known = u.end(p, "")
	return r
}

// sse writes SSE events as the API does, from event name and data pairs.
func sse(pairs ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(pairs); i += 2 {
		b.WriteString("event: " + pairs[i] + "\ndata: " + pairs[i+1] + "\n\n")
	}
	return b.String()
}

const (
	testModel = "claude-sonnet-4-5-20250929"

	messageStart = `{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}`
	messageDelta = `{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}`
	messageStop  = `{"type":"message_stop"}`
)

// sseBody is a whole streamed response with a text block and a tool_use
// block, whose deltas carry text that looks like usage and like SSE.
var sseBody = sse(append(append([]string{
	"message_start", messageStart,
	"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`,
	"ping", `{"type": "ping"}`,
}, textDeltas(40)...),
	"content_block_stop", `{"type":"content_block_stop","index":0}`,
	"content_block_start", `{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"report","input":{}}}`,
	"content_block_delta", `{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"usage\": {\"output_tokens\": 999}, \"model\": \"x\"}"}}`,
	"content_block_stop", `{"type":"content_block_stop","index":1}`,
	"message_delta", messageDelta,
	"message_stop", messageStop,
)...)

// textDeltas returns n content_block_delta events, every few of them
// with text that spells usage, a model, and SSE lines, escaped in JSON.
func textDeltas(n int) []string {
	texts := []string{
		`Here is`, ` the answer: the \"usage\" field reads {\"output_tokens\": 999}`,
		`, and a stream may carry\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":999}}\n\n`,
		` or \"model\": \"claude-evil\" \u2014 data: {\"type\":\"message_start\"} \\`, ` and that is all.`,
	}
	var pairs []string
	for i := range n {
		pairs = append(pairs, "content_block_delta",
			`{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"`+texts[i%len(texts)]+`"}}`)
	}
	return pairs
}

// jsonBody is a whole non-streaming response whose content and tool input
// hold keys named usage and model, which must not count.
const jsonBody = `{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",` +
	`"content":[{"type":"text","text":"The \"usage\": {\"input_tokens\": 999} and \"model\": \"x\" keys, } ] {"},` +
	`{"type":"tool_use","id":"toolu_01","name":"report","input":{"usage":{"input_tokens":999,"output_tokens":999},"model":"claude-evil","nested":[{"usage":null}]}}],` +
	`"stop_reason":"tool_use","stop_sequence":null,` +
	`"usage":{"input_tokens":2095,"cache_creation_input_tokens":2051,"cache_read_input_tokens":3,"cache_creation":{"ephemeral_5m_input_tokens":2051,"ephemeral_1h_input_tokens":0},"output_tokens":503,"server_tool_use":{"web_search_requests":0},"service_tier":"standard"}}`

// usageCase is a response body and what usageScanner reads in it.
type usageCase struct {
	name   string
	stream bool
	body   string
	want   usageResult
}

// usageCases returns the bodies TestUsageScanner reads, which also seed
// FuzzUsageScanner. They are built when a test asks: the test binary also
// runs as the proxy (TestMain), which has no use for them.
func usageCases() []usageCase {
	return []usageCase{
		// Streamed bodies.
		{"stream", true, sseBody, counted(testModel, 0, 25, 15, 0, 0)},
		{"stream with CRLF line ends", true, strings.ReplaceAll(sseBody, "\n", "\r\n"), counted(testModel, 0, 25, 15, 0, 0)},
		{"message_delta repeats input and cache counts: the last wins", true, sse(
			"message_start", `{"type":"message_start","message":{"model":"m","usage":{"input_tokens":25,"cache_creation_input_tokens":50,"cache_read_input_tokens":100,"output_tokens":1}}}`,
			"message_delta", `{"type":"message_delta","delta":{},"usage":{"input_tokens":30,"cache_creation_input_tokens":0,"cache_read_input_tokens":200,"output_tokens":10}}`,
			"message_delta", `{"type":"message_delta","delta":{},"usage":{"output_tokens":15}}`,
		), counted("m", 0, 30, 15, 200, 0)},
		{"null or absent in message_delta keeps the count", true, sse(
			"message_start", messageStart,
			"message_delta", `{"type":"message_delta","usage":{"input_tokens":null,"output_tokens":15}}`,
		), counted(testModel, 0, 25, 15, 0, 0)},
		{"cut after message_start", true, sse("message_start", messageStart) + "event: content_block_delta\ndata: {\"type\":\"con",
			counted(testModel, 0, 25, 1, 0, 0)},
		{"cut inside message_delta's data line", true, sse("message_start", messageStart) + "event: message_delta\ndata: " + messageDelta,
			counted(testModel, 0, 25, 1, 0, 0)},
		{"error event mid-stream", true, sse("message_start", messageStart, "ping", `{"type": "ping"}`,
			"error", `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`),
			counted(testModel, 0, 25, 1, 0, 0)},
		{"malformed counts", true, sse(
			"message_start", `{"type":"message_start","message":{"model":"m","usage":{"input_tokens":-1,"cache_read_input_tokens":1.5,"cache_creation_input_tokens":"12","output_tokens":1e3}}}`,
			"message_delta", `{"type":"message_delta","usage":{"output_tokens":true}}`,
			"message_delta", `{"type":"message_delta","usage":{"input_tokens":{},"cache_read_input_tokens":[1]}}`,
		), counted("m", 7, -1, -1, -1, -1)},
		{"counts at the edge of int64", true, sse(
			"message_start", `{"type":"message_start","message":{"usage":{"input_tokens":9223372036854775807,"output_tokens":9223372036854775808,"cache_read_input_tokens":0}}}`,
		), counted("", 1, 9223372036854775807, -1, 0, -1)},
		{"malformed model", true, sse(
			"message_start", `{"type":"message_start","message":{"model":7,"usage":{"input_tokens":3}}}`,
			"message_start", `{"type":"message_start","message":{"model":null}}`,
			"message_start", `{"type":"message_start","message":{"model":"`+strings.Repeat("m", 257)+`"}}`,
		), counted("", 3, 3, -1, -1, -1)},
		{"model at its longest, with escapes", true, sse(
			"message_start", `{"type":"message_start","message":{"model":"`+strings.Repeat(`\u006d`, 256)+`"}}`,
		), counted(strings.Repeat("m", 256), 0)},
		{"usage not an object", true, sse("message_start", messageStart, "message_delta", `{"type":"message_delta","usage":15}`),
			counted(testModel, 1, 25, 1, 0, 0)},
		{"data line that is not JSON", true, sse("message_start", `{"type":"message_start",`, "message_delta", messageDelta),
			counted("", 1, -1, 15, -1, -1)},
		{"data lines without event lines", true,
			"data: " + messageStart + "\n\ndata:" + messageDelta + "\n\ndata: {\"type\":\"ping\"}\n\n",
			counted(testModel, 0, 25, 15, 0, 0)},
		{"data line without event line, spelt otherwise", true,
			"data: { \"type\": \"message_start\", \"message\": {\"model\": \"m\"}}\n\n", counted("", 0)},
		{"data line under another event", true,
			sse("content_block_delta", `{"type":"message_delta","usage":{"output_tokens":999}}`), counted("", 0)},
		{"event whose data line does not say its type", true,
			sse("message_delta", `{"usage":{"output_tokens":999}}`), counted("", 0)},
		{"event line longer than a line's head", true,
			sse("message_delta"+strings.Repeat(" ", 64), messageDelta), counted("", 0)},
		{"comments, other fields and white space", true,
			": comment\nid: 7\nretry: 100\n\n\r\n" + sse("message_start", messageStart), counted(testModel, 0, 25, 1, 0, 0)},
		{"data line too long to read", true, sse(
			"message_start", `{"type":"message_start","message":{"model":"m","content":["`+strings.Repeat("x", maxDataLine)+`"],"usage":{"input_tokens":25}}}`,
			"message_delta", messageDelta,
		), counted("", 1, -1, 15, -1, -1)},
		{"data line at the longest read", true, sse("message_start", longStart(maxDataLine)), counted("m", 0, 25, -1, -1, -1)},
		{"data line a byte too long", true, sse("message_start", longStart(maxDataLine+1)), counted("", 1)},
		{"long line of another event", true, sse(
			"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"`+strings.Repeat("x", 2*maxDataLine)+`"}}`,
			"message_delta", messageDelta,
		), counted("", 0, -1, 15, -1, -1)},
		{"JSON body read as a stream", true, jsonBody, counted("", 0)},
		{"garbage stream", true, garbage(4096), counted("", 0)},

		// JSON bodies.
		{"JSON", false, jsonBody, counted(testModel, 0, 2095, 503, 3, 2051)},
		{"JSON, indented, usage before model", false, `{
  "usage": {
    "input_tokens": 10,
    "output_tokens": 20
  },
  "content": [],
  "model": "claude-haiku-4-5"
}
`, counted("claude-haiku-4-5", 0, 10, 20, -1, -1)},
		{"JSON keys written with escapes", false, `{"mod\u0065l":"m","\u0075sage":{"output_tokens":4}}`, counted("m", 0, -1, 4, -1, -1)},
		{"JSON usage given twice: the last replaces it whole", false,
			`{"usage":{"input_tokens":1,"output_tokens":"x"},"model":"a","usage":{"output_tokens":3},"model":"b"}`,
			counted("b", 0, -1, 3, -1, -1)},
		{"JSON null usage", false, `{"model":"m","usage":null}`, counted("m", 0)},
		{"JSON malformed counts", false,
			`{"usage":{"input_tokens":-1,"output_tokens":1.5,"cache_read_input_tokens":"12","cache_creation_input_tokens":1e3}}`,
			counted("", 4, -1, -1, -1, -1)},
		{"JSON usage not an object", false, `{"usage":[1,2],"model":"m"}`, counted("m", 1)},
		{"JSON usage a scalar", false, `{"usage":12345678}`, counted("", 1)},
		{"JSON usage too long to read", false,
			`{"usage":{"input_tokens":1,"padding":"` + strings.Repeat("x", maxTopValue) + `"}}`, counted("", 1)},
		{"JSON model not a string", false, `{"model":{"name":"m"},"usage":{"input_tokens":1}}`, counted("", 1, 1, -1, -1, -1)},
		{"JSON null model", false, `{"model":null}`, counted("", 1)},
		{"JSON model too long", false, `{"model":"` + strings.Repeat("m", maxModel+1) + `"}`, counted("", 1)},
		{"JSON cut in usage", false, `{"model":"m","content":[],"usage":{"input_tokens":1`, counted("m", 0)},
		{"JSON empty", false, ``, counted("", 0)},
		{"JSON not an object", false, `[{"model":"m"}]`, counted("", 1)},
		{"JSON trailing garbage", false, `{"model":"m"}x`, counted("m", 1)},
		{"stream read as JSON", false, sseBody, counted("", 1)},
		{"garbage JSON", false, garbage(4096), counted("", 1)},
	}
}

// longStart returns a message_start data value that makes its data line,
// the space after "data:" included, n bytes long.
func longStart(n int) string {
	const head, tail = `{"type":"message_start","message":{"model":"m","content":["`, `"],"usage":{"input_tokens":25}}}`
	return head + strings.Repeat("x", n-len(" "+head+tail)) + tail
}

// garbage returns n random bytes, the same every run; they start with a
// byte that begins no JSON object.
func garbage(n int) string {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	b[0] = 0xff
	return string(b)
}

func TestUsageScanner(t *testing.T) {
	for _, tt := range usageCases() {
		t.Run(tt.name, func(t *testing.T) {
			body := []byte(tt.body)
			check := func(how string, cuts ...int) {
				t.Helper()
				if diff := cmp.Diff(tt.want, scanUsage(tt.stream, body, cuts...)); diff != "" {
					t.Fatalf("result of the body fed %s (-want +got):\n%s", how, diff)
				}
			}
			check("whole")

			// Byte by byte.
			every := make([]int, len(body))
			for i := range every {
				every[i] = i
			}
			check("byte by byte", every...)

			// In two pieces, cut at every byte: at every 61st of a long
			// body, and at each of the first and last 300.
			for i := range len(body) + 1 {
				if len(body) <= 8<<10 || i%61 == 0 || i < 300 || len(body)-i < 300 {
					check("in two at "+strconv.Itoa(i), i)
				}
			}

			// In random pieces, the same every run.
			r := rand.New(rand.NewPCG(7, uint64(len(body))))
			for range 50 {
				var cuts []int
				for at := 0; ; {
					at += 1 + r.IntN(200)
					if at >= len(body) {
						break
					}
					cuts = append(cuts, at)
				}
				check("cut at "+strconv.Itoa(len(cuts))+" random places", cuts...)
			}
		})
	}
}

func TestUsageScannerFeedsNothingBack(t *testing.T) {
	// write neither keeps nor changes the caller's bytes: the proxy
	// reuses its copy buffer for the next piece.
	for _, stream := range []bool{true, false} {
		body := []byte(sseBody)
		if !stream {
			body = []byte(jsonBody)
		}
		orig := bytes.Clone(body)
		var u usageScanner
		u.init(stream)
		buf := make([]byte, 100)
		for p := body; len(p) > 0; {
			n := copy(buf, p)
			u.write(buf[:n])
			for i := range buf {
				buf[i] = 'X' // the next read would overwrite it
			}
			p = p[n:]
		}
		if !bytes.Equal(body, orig) {
			t.Errorf("stream %v: the body changed", stream)
		}
		want := scanUsage(stream, orig)
		var got usageResult
		got.Model, got.Tokens, got.Known, got.ParseErrors = u.result()
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("stream %v, fed through a reused buffer (-want +got):\n%s", stream, diff)
		}
	}
}

func TestTokenTypeLabels(t *testing.T) {
	// Each usage field counts under the label SPEC gives it.
	body := `{"usage":{"input_tokens":1,"output_tokens":2,"cache_read_input_tokens":3,"cache_creation_input_tokens":4}}`
	got := map[string]int64{}
	r := scanUsage(false, []byte(body))
	for t, label := range tokenTypeLabels {
		if r.Known[t] {
			got[label] = r.Tokens[t]
		}
	}
	want := map[string]int64{"input": 1, "output": 2, "cache_read": 3, "cache_creation": 4}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("counts by label of %s (-want +got):\n%s", body, diff)
	}
}

func TestTokenCount(t *testing.T) {
	tests := []struct {
		raw        string
		n          int64
		known, bad bool
	}{
		{"", 0, false, false},
		{"null", 0, false, false},
		{"0", 0, true, false},
		{"15", 15, true, false},
		{"9223372036854775807", 9223372036854775807, true, false},
		{"9223372036854775808", 0, false, true},
		{"99999999999999999999", 0, false, true},
		{"-1", 0, false, true},
		{"-0", 0, false, true},
		{"1.5", 0, false, true},
		{"1.0", 0, false, true},
		{"1e3", 0, false, true},
		{`"12"`, 0, false, true},
		{"true", 0, false, true},
		{"{}", 0, false, true},
	}
	for _, tt := range tests {
		n, known, bad := tokenCount([]byte(tt.raw))
		if n != tt.n || known != tt.known || bad != tt.bad {
			t.Errorf("tokenCount(%q) = %d, %v, %v; want %d, %v, %v", tt.raw, n, known, bad, tt.n, tt.known, tt.bad)
		}
	}
}

// jsonUsage reads the model and usage of a JSON body with encoding/json
// alone, as usageScanner must: the top-level "model" and "usage", the last
// of each if given twice. ok is false if the body is not a JSON object.
func jsonUsage(body []byte) (r usageResult, ok bool) {
	var top map[string]json.RawMessage
	if json.Unmarshal(body, &top) != nil || top == nil {
		return r, false
	}
	if raw, ok := top["model"]; ok {
		var v any
		_ = json.Unmarshal(raw, &v)
		if s, ok := v.(string); ok && len(s) <= maxModel {
			r.Model = s
		} else {
			r.ParseErrors++
		}
	}
	raw, ok := top["usage"]
	if !ok {
		return r, true
	}
	var u map[string]json.RawMessage // keys matched exactly, the last of each
	if len(raw) > maxTopValue || json.Unmarshal(raw, &u) != nil {
		r.ParseErrors++
		return r, true
	}
	for t, key := range usageKeysByType {
		v, ok := u[key]
		if !ok || string(v) == "null" {
			continue // absent or null
		}
		d := json.NewDecoder(bytes.NewReader(v))
		d.UseNumber()
		var x any
		d.Decode(&x)
		num, _ := x.(json.Number)
		n, err := strconv.ParseInt(string(num), 10, 64)
		if err != nil || n < 0 || strconv.FormatInt(n, 10) != string(num) {
			r.ParseErrors++ // not a number, or not written as a plain integer
			continue
		}
		r.Tokens[t], r.Known[t] = n, true
	}
	return r, true
}

// FuzzUsageScanner feeds arbitrary bodies, as a stream and as JSON, whole
// and in pieces (their sizes taken from cuts): the result is the same
// however the body is cut, and for a JSON object it agrees with
// encoding/json's reading of the top-level "model" and "usage".
func FuzzUsageScanner(f *testing.F) {
	for _, tt := range usageCases() {
		if len(tt.body) < 8<<10 {
			f.Add([]byte(tt.body), []byte{3, 1, 7})
		}
	}
	f.Fuzz(func(t *testing.T, body, cuts []byte) {
		var at []int
		for n, c := 0, 0; c < len(cuts) && n+int(cuts[c]) < len(body); c++ {
			n += int(cuts[c])
			at = append(at, n)
		}
		orig := bytes.Clone(body)
		for _, stream := range []bool{true, false} {
			whole := scanUsage(stream, body)
			if diff := cmp.Diff(whole, scanUsage(stream, body, at...)); diff != "" {
				t.Fatalf("stream %v: %q whole and cut at %v (-whole +cut):\n%s", stream, body, at, diff)
			}
			// Gzip-encoded, as the proxy reads such a body: through the
			// decompressing copy, the same counts. The bytes themselves,
			// sent as if gzip (they seldom are), stop the reading only.
			var z bytes.Buffer
			zw := gzip.NewWriter(&z)
			zw.Write(body)
			zw.Close()
			if got := readGzip(stream, z.Bytes(), at); got.Model != whole.Model || got.Tokens != whole.Tokens || got.Known != whole.Known {
				t.Fatalf("stream %v: %q gzip-encoded gives %+v; identity %+v", stream, body, got, whole)
			}
			readGzip(stream, body, at)
			if !bytes.Equal(body, orig) {
				t.Fatalf("reading the usage changed the bytes the client gets")
			}
			if stream {
				continue
			}
			if want, ok := jsonUsage(body); ok {
				if diff := cmp.Diff(want, whole); diff != "" {
					t.Errorf("%q: (-encoding/json +usageScanner):\n%s", body, diff)
				}
			}
		}
	})
}

// sseStream returns a streamed response of about size bytes: mostly
// content_block_delta events of a few words each, as the API streams text.
func sseStream(size int) []byte {
	var b bytes.Buffer
	b.WriteString(sse("message_start", messageStart,
		"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`))
	words := []string{`Here`, ` is the`, ` main.go`, ` file:\n\n`, "```go\nfunc main() {\n", `\tfmt.Println(\"hello, world\")`, `\n}\n`,
		"```\n\n", ` It prints a greeting`, ` and exits; the \"usage\" of`, ` fmt is the`, ` simplest there is.`}
	for i := 0; b.Len() < size; i++ {
		b.WriteString(sse("content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"`+words[i%len(words)]+`"}}`))
	}
	b.WriteString(sse("content_block_stop", `{"type":"content_block_stop","index":0}`,
		"message_delta", messageDelta, "message_stop", messageStop))
	return b.Bytes()
}

// messageBody returns a non-streaming response of about size bytes: one
// long text block with escapes, a tool_use block, and usage last, as the
// API orders it.
func messageBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"`)
	line := `Here is main.go:\n\tfunc main() {\n\t\tfmt.Println(\"hello, \\\"world\\\"\")\n\t}\n` + strings.Repeat("lorem ipsum dolor sit amet ", 10)
	for b.Len() < size {
		b.WriteString(line)
	}
	b.WriteString(`"},{"type":"tool_use","id":"toolu_01","name":"write","input":{"path":"main.go","usage":{"input_tokens":1}}}],` +
		`"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":2051,"cache_read_input_tokens":3,` +
		`"cache_creation":{"ephemeral_5m_input_tokens":2051,"ephemeral_1h_input_tokens":0},"output_tokens":503,"service_tier":"standard"}}`)
	return b.Bytes()
}

func TestUsageBenchmarkBodies(t *testing.T) {
	if got, want := scanUsage(true, sseStream(1<<20)), counted(testModel, 0, 25, 15, 0, 0); got != want {
		t.Errorf("the benchmark stream reads as %+v; want %+v", got, want)
	}
	body := messageBody(1 << 20)
	if !json.Valid(body) {
		t.Fatal("the benchmark message is not valid JSON")
	}
	if got, want := scanUsage(false, body), counted(testModel, 0, 2095, 503, 3, 2051); got != want {
		t.Errorf("the benchmark message reads as %+v; want %+v", got, want)
	}
}

// BenchmarkUsageScanner measures reading the usage of a 1 MiB response,
// streamed and not, fed in the 32 KiB pieces the proxy copies, beside the
// least any reader pays in the same run: finding each '\n' with
// bytes.IndexByte (and, in JSON, each '"').
func BenchmarkUsageScanner(b *testing.B) {
	for _, body := range []struct {
		name   string
		stream bool
		body   []byte
	}{
		{"sse", true, sseStream(1 << 20)},
		{"json", false, messageBody(1 << 20)},
	} {
		b.Run(body.name+"/scan", func(b *testing.B) {
			b.SetBytes(int64(len(body.body)))
			b.ReportAllocs()
			var u usageScanner
			for b.Loop() {
				u.init(body.stream)
				for p := body.body; len(p) > 0; {
					n := min(len(p), 32<<10)
					u.write(p[:n])
					p = p[n:]
				}
				if _, _, known, _ := u.result(); !known[tokenOutput] {
					b.Fatal("no output count")
				}
			}
		})
		b.Run(body.name+"/IndexByte", func(b *testing.B) { benchIndexByte(b, body.body, '\n') })
		if !body.stream {
			// A JSON body has no line ends; the scanner's floor is
			// finding each quote.
			b.Run(body.name+"/IndexByte-quote", func(b *testing.B) { benchIndexByte(b, body.body, '"') })
		}
	}
}

// benchIndexByte finds every c in body, fed in 32 KiB pieces.
func benchIndexByte(b *testing.B, body []byte, c byte) {
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		found := 0
		for p := body; len(p) > 0; {
			n := min(len(p), 32<<10)
			for q := p[:n]; ; {
				i := bytes.IndexByte(q, c)
				if i < 0 {
					break
				}
				found++
				q = q[i+1:]
			}
			p = p[n:]
		}
		if found < 0 {
			b.Fatal("impossible")
		}
	}
}
