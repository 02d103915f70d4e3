package main

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"strconv"
	"time"
)

// What the proxy knows of the Messages API: which requests the upstream
// answers only once the whole response is generated (SPEC: Timeouts,
// phase 2, and Retries).

// defaultClientWait is how long a non-streaming Messages request may wait
// for its response headers when the client does not say: the official SDKs'
// own limit for a non-streaming call (10 minutes).
const defaultClientWait = 600 * time.Second

// maxClientWait bounds x-stainless-timeout, so that any number a client
// sends is a valid time.Duration. A day is far beyond any real call.
const maxClientWait = 24 * time.Hour

// clientMargin is how long before its client would give up the proxy
// answers a non-streaming Messages request that got no response headers:
// the client then reads the 504 and its x-should-retry: false, instead of
// timing out itself and sending the request, to be generated again, anew.
// The client's clock started before the request arrived; a second covers
// the trip and the upload.
const clientMargin = time.Second

// phase2 sets how long the upstream may take to send the response headers
// of r, which arrived at start (its body buffered in x), and how many
// attempts a timeout of that wait allows. A streaming request and any call
// other than a Messages request get timeout_secs and the configured
// retries. A non-streaming Messages request waits until just before its
// client would give up, never less than timeout_secs, and gets one
// attempt: its upstream may still be generating, and a retry would
// generate, and bill, the answer again.
func (s *server) phase2(x *exchange, r *http.Request, start time.Time) {
	x.headerTimeout, x.maxAttempts = s.cfg.Timeout, s.tun.attempts
	if r.Method != http.MethodPost || r.URL.Path != "/v1/messages" || streamRequested(x.reqBody) {
		return
	}
	x.maxAttempts = 1
	x.clientWait = clientWait(r.Header)
	if deadline := start.Add(x.clientWait - clientMargin); time.Until(deadline) > s.cfg.Timeout {
		x.clientDeadline = deadline
	}
}

// clientWait returns how long the client said it would wait for the
// response: x-stainless-timeout in seconds (the SDKs and Claude Code send
// it; the Python SDK writes a float such as "600.0"), else 600 s.
func clientWait(h http.Header) time.Duration {
	v := h.Get("X-Stainless-Timeout")
	if v == "" {
		return defaultClientWait
	}
	sec, err := strconv.ParseFloat(v, 64)
	if err != nil || !(sec > 0) { // NaN fails the comparison too
		return defaultClientWait
	}
	return time.Duration(math.Min(sec, maxClientWait.Seconds()) * float64(time.Second))
}

// streamRequested reports whether a Messages request body asks for a
// streamed response: a JSON object whose top-level "stream" is true.
// "stream" keys inside nested values (message content, tool input) do not
// count. A body that is not a JSON object counts as streaming, so it keeps
// the short header timeout and its retries; the API answers such a body
// with a quick 400 anyway.
//
// The body is scanned once, in place: strings are skipped with
// bytes.IndexByte, nested values by counting brackets, nothing is copied
// or decoded except a key written with escapes.
func streamRequested(body []byte) bool {
	stream, ok := topLevelStream(body)
	return stream || !ok
}

// topLevelStream reports whether the object in b has "stream": true at
// the top level (the last one wins, as in encoding/json), and whether b
// is shaped like one JSON object.
func topLevelStream(b []byte) (stream, ok bool) {
	i := skipSpace(b, 0)
	if i == len(b) || b[i] != '{' {
		return false, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return false, skipSpace(b, i+1) == len(b)
	}
	for {
		// "key"
		if i == len(b) || b[i] != '"' {
			return false, false
		}
		end := skipString(b, i)
		if end < 0 {
			return false, false
		}
		isStream := isKey(b[i:end], "stream")
		// :
		i = skipSpace(b, end)
		if i == len(b) || b[i] != ':' {
			return false, false
		}
		// value
		i = skipSpace(b, i+1)
		end = skipValue(b, i)
		if end < 0 {
			return false, false
		}
		if isStream {
			stream = string(b[i:end]) == "true"
		}
		// , or }
		i = skipSpace(b, end)
		switch {
		case i == len(b):
			return false, false
		case b[i] == ',':
			i = skipSpace(b, i+1)
		case b[i] == '}':
			return stream, skipSpace(b, i+1) == len(b)
		default:
			return false, false
		}
	}
}

// isKey reports whether quoted, a JSON string with its quotes, is name.
func isKey(quoted []byte, name string) bool {
	if bytes.IndexByte(quoted, '\\') < 0 {
		return string(quoted[1:len(quoted)-1]) == name
	}
	var s string // written with escapes, such as "str\u0065am": rare
	return json.Unmarshal(quoted, &s) == nil && s == name
}

// skipSpace returns the index of the first byte at or after i that is not
// JSON white space.
func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\n' || b[i] == '\r' || b[i] == '\t') {
		i++
	}
	return i
}

// skipString returns the index just past the string that starts with the
// quote at b[i], or -1 if it is not terminated.
func skipString(b []byte, i int) int {
	for j := i + 1; ; {
		q := bytes.IndexByte(b[j:], '"')
		if q < 0 {
			return -1
		}
		j += q
		// The quote is escaped if an odd number of backslashes precede it.
		n := 0
		for k := j - 1; k > i && b[k] == '\\'; k-- {
			n++
		}
		j++
		if n%2 == 0 {
			return j
		}
	}
}

// skipValue returns the index just past the JSON value that starts at
// b[i], or -1 if there is none. Objects and arrays are skipped by
// counting brackets (strings inside them skipped whole), numbers and the
// literals as one run of the characters they may hold.
func skipValue(b []byte, i int) int {
	if i == len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				if j = skipString(b, j); j < 0 {
					return -1
				}
				j-- // the loop's j++ moves past the closing quote
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(b) && isScalarByte(b[j]) {
		j++
	}
	if j == i {
		return -1
	}
	return j
}

// isScalarByte reports whether c may appear in a JSON number, true, false
// or null.
func isScalarByte(c byte) bool {
	return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '+' || c == '.' || c == 'E'
}
