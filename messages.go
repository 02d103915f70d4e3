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
func (s *server) phase2(x *exchange, r *http.Request, start time.Time, scan *streamScanner) {
	x.maxAttempts = s.tun.attempts
	if scan == nil || scan.streaming() {
		return
	}
	x.maxAttempts = 1
	x.clientWait = clientWait(r.Header)
	if deadline := start.Add(x.clientWait - clientMargin); time.Until(deadline) > s.cfg.Timeout {
		x.clientDeadline = deadline
	}
}

// isMessagesCall reports whether r is a Messages request: a POST to
// exactly /v1/messages, with any query (Claude Code sends ?beta=true); not
// count_tokens or batches.
func isMessagesCall(r *http.Request) bool {
	return r.Method == http.MethodPost && r.URL.Path == "/v1/messages"
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
// streamed response (see streamScanner), the body given whole.
func streamRequested(body []byte) bool {
	var sc streamScanner
	sc.write(body)
	return sc.streaming()
}

// streamScanner finds the top-level "stream" key of a JSON object fed to it
// in pieces, as the body arrives: nothing is copied, decoded or read twice.
// Strings, the bulk of a Messages body, are skipped with bytes.IndexByte;
// nested values by counting brackets. "stream" keys inside nested values
// (message content, tool input) do not count. The zero value is ready.
type streamScanner struct {
	state  scanState
	depth  int  // in scanNested: brackets open
	inStr  bool // in scanNested: inside a string
	esc    bool // inside a string: the next byte is escaped
	key    [16]byte
	keyLen int  // bytes of the key seen; beyond len(key) it is not "stream"
	keyEsc bool // the key holds escapes: decoded at its end
	isKey  bool // the key just read is "stream"
	val    [5]byte
	valLen int  // bytes of a top-level scalar seen
	stream bool // the last top-level "stream" was true
}

type scanState uint8

const (
	scanBegin    scanState = iota // before '{'
	scanKeyOrEnd                  // after '{': a key or '}'
	scanKeyStart                  // after ',': a key
	scanKey                       // inside a key
	scanColon                     // after a key
	scanValue                     // after ':'
	scanString                    // inside a top-level string value
	scanNested                    // inside a top-level object or array value
	scanScalar                    // inside a number, true, false or null
	scanNext                      // after a value: ',' or '}'
	scanDone                      // after the closing '}': white space only
	scanBad                       // not one JSON object
)

// streaming reports whether the body fed so far asks for a stream: its
// top-level "stream" is true (the last one wins, as in encoding/json), or
// it is not one JSON object. Such a body keeps the short header timeout
// and its retries; the API answers a malformed body with a quick 400.
func (sc *streamScanner) streaming() bool {
	return sc.state != scanDone || sc.stream
}

// write feeds the next piece of the body.
func (sc *streamScanner) write(p []byte) {
	for i := 0; i < len(p); {
		c := p[i]
		switch sc.state {
		case scanBegin, scanKeyOrEnd, scanKeyStart, scanColon, scanValue, scanNext, scanDone:
			if c == ' ' || c == '\n' || c == '\r' || c == '\t' {
				i++
				continue
			}
			sc.punct(c)
			i++
		case scanKey:
			start := i
			end, closed := sc.skipString(p, i)
			sc.addKey(p[start:end])
			i = end
			if closed {
				sc.endKey()
				sc.state = scanColon
			}
		case scanString:
			end, closed := sc.skipString(p, i)
			i = end
			if closed {
				sc.state = scanNext
			}
		case scanNested:
			i = sc.skipNested(p, i)
		case scanScalar:
			if !isScalarByte(c) {
				if sc.isKey {
					sc.stream = string(sc.val[:sc.valLen]) == "true"
				}
				sc.state = scanNext // c is read again in that state
				continue
			}
			if sc.valLen < len(sc.val) {
				sc.val[sc.valLen] = c
			}
			sc.valLen++ // beyond len(val) it is not "true"
			if sc.valLen > len(sc.val) {
				sc.valLen = len(sc.val)
				sc.val[0] = 0
			}
			i++
		case scanBad:
			return
		}
	}
}

// punct moves on at a structural byte c outside strings and values.
func (sc *streamScanner) punct(c byte) {
	next := scanBad
	switch {
	case sc.state == scanBegin && c == '{':
		next = scanKeyOrEnd
	case (sc.state == scanKeyOrEnd || sc.state == scanNext) && c == '}':
		next = scanDone
	case (sc.state == scanKeyOrEnd || sc.state == scanKeyStart) && c == '"':
		sc.keyLen, sc.keyEsc, sc.esc = 0, false, false
		next = scanKey
	case sc.state == scanColon && c == ':':
		next = scanValue
	case sc.state == scanNext && c == ',':
		next = scanKeyStart
	case sc.state == scanValue && c == '"':
		sc.esc = false
		sc.setStream(false)
		next = scanString
	case sc.state == scanValue && (c == '{' || c == '['):
		sc.depth, sc.inStr, sc.esc = 1, false, false
		sc.setStream(false)
		next = scanNested
	case sc.state == scanValue && isScalarByte(c):
		sc.val[0], sc.valLen = c, 1
		next = scanScalar
	}
	sc.state = next
}

// setStream records v as the value of the current key if it is "stream".
func (sc *streamScanner) setStream(v bool) {
	if sc.isKey {
		sc.stream = v
	}
}

// addKey collects the bytes of a key, as far as they can spell "stream".
func (sc *streamScanner) addKey(b []byte) {
	if bytes.IndexByte(b, '\\') >= 0 {
		sc.keyEsc = true
	}
	if sc.keyLen+len(b) <= len(sc.key) {
		copy(sc.key[sc.keyLen:], b)
	}
	sc.keyLen += len(b)
}

// endKey decides whether the key just read, its closing quote included in
// the bytes collected, is "stream".
func (sc *streamScanner) endKey() {
	sc.isKey = false
	if sc.keyLen > len(sc.key) {
		return // longer than any spelling of "stream" that matters here
	}
	k := sc.key[:sc.keyLen-1] // without the closing quote
	if !sc.keyEsc {
		sc.isKey = string(k) == "stream"
		return
	}
	var quoted [len(streamScanner{}.key) + 2]byte
	quoted[0] = '"'
	n := copy(quoted[1:], k)
	quoted[n+1] = '"'
	var s string // written with escapes, such as "str\u0065am": rare
	sc.isKey = json.Unmarshal(quoted[:n+2], &s) == nil && s == "stream"
}

// skipString moves through a string from p[i], whose opening quote has
// been read, and returns the index after the bytes consumed and whether
// the closing quote was among them.
func (sc *streamScanner) skipString(p []byte, i int) (int, bool) {
	for i < len(p) {
		if sc.esc {
			sc.esc = false
			i++
			continue
		}
		q := bytes.IndexByte(p[i:], '"')
		if q < 0 {
			// The piece ends inside the string: an odd run of backslashes
			// at its end escapes the first byte of the next piece.
			sc.esc = trailingBackslashes(p[i:])%2 == 1
			return len(p), false
		}
		end := i + q
		// The segment p[i:end] starts unescaped, so the quote is escaped
		// if an odd number of backslashes precede it.
		if trailingBackslashes(p[i:end])%2 == 0 {
			return end + 1, true
		}
		i = end + 1
	}
	return i, false
}

// trailingBackslashes counts the backslashes that end b.
func trailingBackslashes(b []byte) int {
	n := 0
	for n < len(b) && b[len(b)-1-n] == '\\' {
		n++
	}
	return n
}

// skipNested moves through a nested value from p[i] and returns the index
// after the bytes consumed; the state becomes scanNext at its end.
func (sc *streamScanner) skipNested(p []byte, i int) int {
	for i < len(p) {
		if sc.inStr {
			end, closed := sc.skipString(p, i)
			i = end
			sc.inStr = !closed
			continue
		}
		switch p[i] {
		case '"':
			sc.inStr, sc.esc = true, false
		case '{', '[':
			sc.depth++
		case '}', ']':
			if sc.depth--; sc.depth == 0 {
				sc.state = scanNext
				return i + 1
			}
		}
		i++
	}
	return i
}

// isScalarByte reports whether c may appear in a JSON number, true, false
// or null.
func isScalarByte(c byte) bool {
	return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '+' || c == '.' || c == 'E'
}
