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

// streamScanner finds the top-level "stream" of a Messages request body fed
// to it in pieces, as the body arrives (see objectScanner). The zero value
// is ready.
type streamScanner struct {
	obj    objectScanner
	stream bool // the last top-level "stream" was true
}

// streamKey is the key streamScanner looks for.
var streamKey = []string{"stream"}

// streaming reports whether the body fed so far asks for a stream: its
// top-level "stream" is true (the last one wins, as in encoding/json), or
// it is not one JSON object. Such a body keeps the short header timeout
// and its retries; the API answers a malformed body with a quick 400.
func (sc *streamScanner) streaming() bool {
	return !sc.obj.complete() || sc.stream
}

// write feeds the next piece of the body.
func (sc *streamScanner) write(p []byte) {
	for len(p) > 0 {
		// Nothing is captured but scalars: a string, object or array is
		// not true.
		n, k := sc.obj.next(p, streamKey, 0)
		p = p[n:]
		if k >= 0 {
			v, whole := sc.obj.value()
			sc.stream = whole && string(v) == "true"
		}
	}
}

// maxSoughtKey is the longest key, in bytes, objectScanner can look for:
// "cache_creation_input_tokens".
const maxSoughtKey = 27

// objectScanner finds chosen keys at the top level of a JSON object fed to
// it in pieces, as the body arrives, and captures their values, raw:
// nothing else is copied, decoded or read twice. Strings, the bulk of a
// Messages body, are skipped with bytes.IndexByte; nested values by
// counting brackets. Keys inside nested values (message content, tool
// input) do not count. Of the JSON grammar it checks the top level only:
// every JSON object passes, and a body that fails is not one. The zero value
// is ready.
type objectScanner struct {
	state scanState
	depth int  // in scanNested: brackets open
	inStr bool // in scanNested: inside a string
	esc   bool // inside a string: the next byte is escaped
	// key holds the key being read, its closing quote included, as far as
	// it can spell a sought key: 6 bytes a character if written in \u
	// escapes, as in "\u0073\u0074\u0072\u0065\u0061\u006d".
	key    [6*maxSoughtKey + 1]byte
	keyLen int  // bytes of the key seen; beyond len(key) it is not sought
	keyEsc bool // the key holds escapes: decoded at its end
	found  int  // 1 + the index of the sought key just read; 0 for another

	// The value of a sought key.
	scalar bool     // it is a number, true, false or null, held in val
	val    [20]byte // a scalar's bytes: enough for any int64 count
	valLen int
	buf    []byte // a string's, object's or array's bytes
	over   bool   // it is longer than the capture allows
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

// complete reports whether the object has ended, with nothing but white
// space after it so far.
func (sc *objectScanner) complete() bool { return sc.state == scanDone }

// bad reports whether the bytes fed so far are not one JSON object.
func (sc *objectScanner) bad() bool { return sc.state == scanBad }

// value returns the value whose end next reported last, raw, if it is
// whole: a scalar of at most len(val) bytes, or a string, object or array
// within next's limit; else nil and false. It stays valid until the next
// call of next.
func (sc *objectScanner) value() ([]byte, bool) {
	switch {
	case sc.over:
		return nil, false
	case sc.scalar:
		return sc.val[:sc.valLen], true
	}
	return sc.buf, true
}

// next reads p until the value of one of keys ends, or to its end. It
// returns the number of bytes read and the index in keys of the key whose
// value just ended (value returns it), or -1. Strings, objects and arrays
// are captured up to limit bytes. keys are escape-free and at most
// maxSoughtKey bytes long; each call passes the same ones. Only the value
// of a sought key stops the scan, so a caller feeding a body in pieces
// calls next again on the rest of p.
func (sc *objectScanner) next(p []byte, keys []string, limit int) (int, int) {
	for i := 0; i < len(p); {
		c := p[i]
		switch sc.state {
		case scanBegin, scanKeyOrEnd, scanKeyStart, scanColon, scanValue, scanNext, scanDone:
			if c == ' ' || c == '\n' || c == '\r' || c == '\t' {
				i++
				continue
			}
			sc.punct(c)
			if sc.found > 0 && (sc.state == scanString || sc.state == scanNested) {
				sc.capture(p[i:i+1], limit) // the opening quote or bracket
			}
			i++
		case scanKey:
			start := i
			end, closed := sc.skipString(p, i)
			sc.addKey(p[start:end])
			i = end
			if closed {
				sc.endKey(keys)
				sc.state = scanColon
			}
		case scanString:
			start := i
			end, closed := sc.skipString(p, i)
			i = end
			if sc.found > 0 {
				sc.capture(p[start:end], limit)
			}
			if closed {
				sc.state = scanNext
				if sc.found > 0 {
					return i, sc.found - 1
				}
			}
		case scanNested:
			start := i
			i = sc.skipNested(p, i)
			if sc.found > 0 {
				sc.capture(p[start:i], limit)
				if sc.state == scanNext {
					return i, sc.found - 1
				}
			}
		case scanScalar:
			if !isScalarByte(c) {
				sc.state = scanNext // c is read again in that state
				if sc.found > 0 {
					return i, sc.found - 1
				}
				continue
			}
			if sc.valLen < len(sc.val) {
				sc.val[sc.valLen] = c
				sc.valLen++
			} else {
				sc.over = true
			}
			i++
		case scanBad:
			return len(p), -1
		}
	}
	return len(p), -1
}

// punct moves on at a structural byte c outside strings and values.
func (sc *objectScanner) punct(c byte) {
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
		sc.startValue(false)
		next = scanString
	case sc.state == scanValue && (c == '{' || c == '['):
		sc.depth, sc.inStr, sc.esc = 1, false, false
		sc.startValue(false)
		next = scanNested
	case sc.state == scanValue && isScalarByte(c):
		sc.startValue(true)
		sc.val[0], sc.valLen = c, 1
		next = scanScalar
	}
	sc.state = next
}

// startValue forgets the value captured last.
func (sc *objectScanner) startValue(scalar bool) {
	sc.scalar, sc.over = scalar, false
	sc.buf = sc.buf[:0]
}

// capture appends b to the value being captured, unless that makes it
// longer than limit: then it is not whole, and nothing more is kept.
func (sc *objectScanner) capture(b []byte, limit int) {
	if sc.over || len(sc.buf)+len(b) > limit {
		sc.over = true
		return
	}
	sc.buf = append(sc.buf, b...)
}

// addKey collects the bytes of a key, as far as they can spell a sought
// key.
func (sc *objectScanner) addKey(b []byte) {
	if bytes.IndexByte(b, '\\') >= 0 {
		sc.keyEsc = true
	}
	if sc.keyLen+len(b) <= len(sc.key) {
		copy(sc.key[sc.keyLen:], b)
	}
	sc.keyLen += len(b)
}

// endKey decides which of keys, if any, is the key just read, its closing
// quote included in the bytes collected.
func (sc *objectScanner) endKey(keys []string) {
	sc.found = 0
	if sc.keyLen > len(sc.key) {
		return // longer than any spelling of a sought key
	}
	if !sc.keyEsc {
		k := sc.key[:sc.keyLen-1] // without the closing quote
		for i, s := range keys {
			if string(k) == s {
				sc.found = i + 1
				return
			}
		}
		return
	}
	var quoted [len(objectScanner{}.key) + 1]byte
	quoted[0] = '"'
	n := copy(quoted[1:], sc.key[:sc.keyLen])
	var s string // written with escapes, such as "str\u0065am": rare
	if json.Unmarshal(quoted[:n+1], &s) != nil {
		return
	}
	for i, k := range keys {
		if s == k {
			sc.found = i + 1
			return
		}
	}
}

// skipString moves through a string from p[i], whose opening quote has
// been read, and returns the index after the bytes consumed and whether
// the closing quote was among them.
func (sc *objectScanner) skipString(p []byte, i int) (int, bool) {
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
func (sc *objectScanner) skipNested(p []byte, i int) int {
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
