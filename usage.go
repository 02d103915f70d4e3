package main

import (
	"bytes"
	"encoding/json"
	"math"
)

// The tokens a Messages response cost, read from its body as it streams
// through the proxy: no buffering, no added latency (SPEC: Claude plan
// usage). The body is read after decoding; the caller decides which
// responses are read and what becomes of the counts.

// tokenType indexes token counts: input, output, cache_read,
// cache_creation (the label values of anthropic_tokens_total{type}).
type tokenType int

const (
	tokenInput tokenType = iota
	tokenOutput
	tokenCacheRead
	tokenCacheCreation
	numTokenTypes
)

// tokenTypeLabels are the type label values, by tokenType.
var tokenTypeLabels = [numTokenTypes]string{"input", "output", "cache_read", "cache_creation"}

const (
	// maxDataLine bounds an SSE data line the scanner keeps to decode. A
	// message_start line is about 500 bytes, a message_delta line 200;
	// 64 KiB leaves room for fields the API may add.
	maxDataLine = 64 << 10

	// maxTopValue bounds the top-level "model" and "usage" of a JSON body
	// the scanner keeps to decode: a usage object is about 300 bytes.
	maxTopValue = 4 << 10

	// maxModel bounds a model name, in bytes once unescaped: the API's
	// are about 30 bytes long.
	maxModel = 256
)

// usageScanner reads the usage of one successful Messages response from
// its (already decoded: identity) body bytes, fed in pieces of any size as
// they stream through the proxy.
//
// A streamed body (text/event-stream) is read line by line: only the data
// lines of message_start and message_delta events are kept and decoded;
// every other line is skipped with bytes.IndexByte. A JSON body is read
// with objectScanner, which keeps the top-level "model" and "usage" only.
type usageScanner struct {
	usageState

	// Room for the values captured, so that the usual response allocates
	// nothing more (a longer value grows its slice): a message_start line
	// and its "message" are about 500 bytes, a usage object 300, a model
	// name 30. Scratch space: init does not clear it.
	capture  [1 << 10]byte
	inner    [512]byte
	dataBuf  [768]byte
	modelBuf [128]byte
}

// usageState is what a usageScanner knows of the body fed so far.
type usageState struct {
	stream bool // the body is text/event-stream, else JSON

	// What is known so far.
	model  string
	tokens [numTokenTypes]int64
	known  [numTokenTypes]bool
	errs   int // malformed values and data lines, except a JSON body's model and usage

	// A JSON body.
	obj       objectScanner
	modelErr  bool // the last top-level "model" is malformed
	usageErrs int  // malformed values in the last top-level "usage"

	// A streamed body.
	line    lineState
	head    [64]byte // the first bytes of a line split across writes: "event: message_delta\r" and `data: {"type":"message_delta"` fit
	headLen int
	event   eventKind // the event named since the last blank line
	data    []byte    // the data line being kept, after "data:"
}

// lineState is where in an SSE line the scanner is.
type lineState uint8

const (
	lineHead lineState = iota // reading its first bytes into head
	lineSkip                  // skipping to its end
	lineData                  // keeping a data line to decode at its end
)

// eventKind is what the event line of the current SSE event named.
type eventKind uint8

const (
	eventNone  eventKind = iota // no event line yet
	eventUsage                  // message_start or message_delta
	eventOther                  // any other
)

// lineAction is what becomes of an SSE line, decided from its first bytes.
type lineAction uint8

const (
	lineUndecided lineAction = iota // more of the line is needed
	lineIgnored                     // nothing in it counts
	lineKept                        // a data line to decode
)

// init makes u ready for a body, streamed (SSE) or not (JSON).
func (u *usageScanner) init(stream bool) {
	u.usageState = usageState{stream: stream}
	u.obj.buf = u.capture[:0]
}

// write feeds the next bytes of the body. It never keeps or modifies p.
func (u *usageScanner) write(p []byte) {
	if u.stream {
		u.writeSSE(p)
	} else {
		u.writeJSON(p)
	}
}

// result reports what the body fed so far tells: the model it names,
// unescaped but not sanitised ("" if none); the token counts and which of
// them it gave; and how many values in it were malformed, and ignored.
func (u *usageScanner) result() (model string, tokens [numTokenTypes]int64, known [numTokenTypes]bool, parseErrors int) {
	parseErrors = u.errs + u.usageErrs
	if u.modelErr {
		parseErrors++
	}
	if !u.stream && u.obj.bad() {
		parseErrors++ // not one JSON object
	}
	return u.model, u.tokens, u.known, parseErrors
}

// usageKeys are the top-level keys of a JSON body the scanner reads, by
// the index objectScanner reports.
var usageKeys = []string{"model", "usage"}

// writeJSON feeds the next bytes of a JSON body. A top-level key given
// twice counts once, with its last value, as encoding/json reads it.
func (u *usageScanner) writeJSON(p []byte) {
	for len(p) > 0 {
		n, k := u.obj.next(p, usageKeys, maxTopValue)
		p = p[n:]
		if k < 0 {
			continue
		}
		v, whole := u.obj.value()
		if usageKeys[k] == "model" {
			name, bad := u.modelBytes(v, whole)
			u.model, u.modelErr = "", bad
			if !bad {
				u.setModel(name)
			}
			continue
		}
		c := usage{errs: 1}
		if whole {
			c = readUsage(v)
		}
		u.tokens, u.known, u.usageErrs = c.tokens, c.known, c.errs
	}
}

// writeSSE feeds the next bytes of an SSE body. Lines end in "\n" or
// "\r\n", as the API sends them.
func (u *usageScanner) writeSSE(p []byte) {
	for len(p) > 0 {
		nl := bytes.IndexByte(p, '\n')
		end := nl // of the line's bytes in p
		if nl < 0 {
			end = len(p)
		}
		switch u.line {
		case lineHead:
			if u.headLen == 0 && nl >= 0 {
				u.endLine(p[:nl]) // the whole line is in p: read in place
				p = p[nl+1:]
				continue
			}
			n := copy(u.head[u.headLen:], p[:end])
			u.headLen += n
			h := u.head[:u.headLen]
			if n == end && nl >= 0 {
				u.endLine(h) // the whole line fits in head
				p = p[nl+1:]
				continue
			}
			switch u.classify(h, false, n < end) {
			case lineUndecided: // only when p ends, before head is full
				return
			case lineIgnored:
				if nl >= 0 {
					p = p[nl+1:] // the rest of the line, found already
					u.headLen = 0
					continue
				}
				u.line = lineSkip
			case lineKept:
				u.line = lineData
				if u.data == nil {
					u.data = u.dataBuf[:0] // holds the usual line
				}
				u.data = append(u.data[:0], h[len("data:"):]...)
			}
			p = p[n:]
		case lineSkip:
			if nl < 0 {
				return
			}
			p = p[nl+1:]
			u.line, u.headLen = lineHead, 0
		case lineData:
			if len(u.data)+end > maxDataLine {
				u.errs++ // a line too long to read
				u.line = lineSkip
				continue
			}
			u.data = append(u.data, p[:end]...)
			if nl < 0 {
				return
			}
			u.readData(u.data)
			p = p[nl+1:]
			u.line, u.headLen = lineHead, 0
		}
	}
}

// endLine reads a whole line, without its "\n": the line is in p, or fits
// in head.
func (u *usageScanner) endLine(line []byte) {
	h := line
	if n := len(h); n > 0 && h[n-1] == '\r' {
		h = h[:n-1]
	}
	if u.classify(h, true, false) == lineKept {
		if v := line[len("data:"):]; len(v) > maxDataLine {
			u.errs++ // a line too long to read, as in lineData
		} else {
			u.readData(v)
		}
	}
	u.headLen = 0
}

// classify decides what to do with a line from its first bytes h: all of
// them if ended (without the line end); else the bytes so far, and long if
// the line goes on past len(head). The event line of an SSE event, and the
// blank line ending it, are read here. A data line is kept if its event is
// message_start or message_delta or, with no event line, if its JSON starts
// with that type.
func (u *usageScanner) classify(h []byte, ended, long bool) lineAction {
	if hasPrefix(h, "data:") {
		switch u.event {
		case eventUsage:
			return lineKept
		case eventOther:
			return lineIgnored
		}
		return dataType(h[len("data:"):], ended)
	}
	if hasPrefix(h, "event:") {
		switch {
		case ended:
			v := h[len("event:"):]
			if len(v) > 0 && v[0] == ' ' {
				v = v[1:]
			}
			u.event = eventOther
			if string(v) == "message_start" || string(v) == "message_delta" {
				u.event = eventUsage
			}
		case long:
			u.event = eventOther // no name of interest is that long
		default:
			return lineUndecided
		}
		return lineIgnored
	}
	switch {
	case ended && len(h) == 0:
		u.event = eventNone // a blank line ends the event
	case !ended && (startOf(h, "data:") || startOf(h, "event:")):
		return lineUndecided
	}
	return lineIgnored // a comment or another field
}

// dataType decides whether to keep a data line with no event line, from
// the value v it has so far (all of it if ended): JSON whose type is
// message_start or message_delta, written as the API writes it.
func dataType(v []byte, ended bool) lineAction {
	if len(v) > 0 && v[0] == ' ' {
		v = v[1:] // the space the field may start with
	} else if len(v) == 0 && !ended {
		return lineUndecided // the space may come next
	}
	action := lineIgnored
	for _, t := range [...]string{`{"type":"message_start"`, `{"type":"message_delta"`} {
		switch {
		case hasPrefix(v, t):
			return lineKept
		case !ended && startOf(v, t):
			action = lineUndecided // v is the start of t
		}
	}
	return action
}

// hasPrefix reports whether b begins with s: bytes.HasPrefix, with an
// inline comparison where s is a constant.
func hasPrefix(b []byte, s string) bool {
	return len(b) >= len(s) && string(b[:len(s)]) == s
}

// startOf reports whether b is the start of s.
func startOf(b []byte, s string) bool {
	return len(b) <= len(s) && string(b) == s[:len(b)]
}

// usageKeysByType are the keys of a usage object, by tokenType.
var usageKeysByType = []string{
	tokenInput:         "input_tokens",
	tokenOutput:        "output_tokens",
	tokenCacheRead:     "cache_read_input_tokens",
	tokenCacheCreation: "cache_creation_input_tokens",
}

// usage is what one usage object gives: the counts it has, and how many of
// them were malformed.
type usage struct {
	tokens [numTokenTypes]int64
	known  [numTokenTypes]bool
	errs   int
}

// readUsage reads a usage object, raw: its four counts, at its top level
// (cache_creation, server_tool_use and the rest are skipped). A value that
// is not one JSON object is one malformed value; null gives nothing.
func readUsage(v []byte) (u usage) {
	if string(v) == "null" {
		return u
	}
	var sc objectScanner
	var bad [numTokenTypes]bool // the last value of that count is malformed
	for len(v) > 0 {
		n, k := sc.next(v, usageKeysByType, 0) // counts are scalars: nothing to capture
		v = v[n:]
		if k < 0 {
			continue
		}
		raw, whole := sc.value()
		count, known, malformed := tokenCount(raw)
		bad[k] = malformed || !whole
		u.tokens[k], u.known[k] = count, known && !bad[k]
	}
	if !sc.complete() {
		return usage{errs: 1}
	}
	for _, b := range bad {
		if b {
			u.errs++
		}
	}
	return u
}

// add takes the counts c gives: each replaces the count known before, as
// message_delta's cumulative counts replace message_start's.
func (u *usageScanner) add(c usage) {
	for t, ok := range c.known {
		if ok {
			u.tokens[t], u.known[t] = c.tokens[t], true
		}
	}
	u.errs += c.errs
}

// Keys of a kept SSE data line, and of its "message".
var (
	dataKeys    = []string{"type", "message", "usage"}
	messageKeys = []string{"model", "usage"}
)

// readData reads a kept data line: message_start carries the model and the
// usage so far in "message", message_delta the cumulative usage beside
// it. A line that is not one JSON object is one parse error; one whose
// type is neither is ignored.
func (u *usageScanner) readData(line []byte) {
	var sc objectScanner
	sc.buf = u.capture[:0]
	var typ [len("message_delta") + 2]byte
	typLen := 0
	var model []byte
	modelSeen, modelBad := false, false
	var start, delta usage
	for len(line) > 0 {
		n, k := sc.next(line, dataKeys, maxDataLine)
		line = line[n:]
		if k < 0 {
			continue
		}
		v, whole := sc.value()
		switch dataKeys[k] {
		case "type":
			typLen = copy(typ[:], v)
			if len(v) > len(typ) {
				typLen = 0
			}
		case "message":
			if !whole {
				continue
			}
			var inner objectScanner
			inner.buf = u.inner[:0]
			for len(v) > 0 {
				n, k := inner.next(v, messageKeys, maxTopValue)
				v = v[n:]
				if k < 0 {
					continue
				}
				w, whole := inner.value()
				if messageKeys[k] == "model" {
					modelSeen = true
					model, modelBad = u.modelBytes(w, whole)
				} else if whole {
					start = readUsage(w)
				} else {
					start = usage{errs: 1}
				}
			}
		case "usage":
			if whole {
				delta = readUsage(v)
			} else {
				delta = usage{errs: 1}
			}
		}
	}
	if !sc.complete() {
		u.errs++
		return
	}
	switch string(typ[:typLen]) {
	case `"message_start"`:
		if modelSeen && modelBad {
			u.errs++
		} else if modelSeen {
			u.setModel(model)
		}
		u.add(start)
	case `"message_delta"`:
		u.add(delta)
	}
}

// tokenCount reads a count: a JSON number that is a non-negative integer
// within int64, without fraction, exponent or sign. Absent (empty) or null
// is unknown, not malformed; anything else (-1, 1.5, 1e3, "12", true) is
// malformed.
func tokenCount(v []byte) (n int64, known, bad bool) {
	if len(v) == 0 || string(v) == "null" {
		return 0, false, false
	}
	n, ok := parseDigits(v)
	return n, ok, !ok
}

// parseDigits reads a non-negative decimal integer within int64: digits
// only, at least one.
func parseDigits[T string | []byte](v T) (int64, bool) {
	var n int64
	for i := 0; i < len(v); i++ {
		d := int64(v[i] - '0')
		if v[i] < '0' || v[i] > '9' || n > (math.MaxInt64-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, len(v) > 0
}

// modelBytes reads a model name: a JSON string (null is not one) of at
// most maxModel bytes once unescaped, returned in u.modelBuf, or malformed.
func (u *usageScanner) modelBytes(v []byte, whole bool) (name []byte, bad bool) {
	if !whole || len(v) < 2 || v[0] != '"' {
		return nil, true
	}
	inner := v[1 : len(v)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		if len(inner) > maxModel {
			return nil, true
		}
		return append(u.modelBuf[:0], inner...), false
	}
	var s string // written with escapes: rare
	if json.Unmarshal(v, &s) != nil || len(s) > maxModel {
		return nil, true
	}
	return append(u.modelBuf[:0], s...), false
}

// setModel records the model the response names. The string is made once
// per name change: a stream names it once.
func (u *usageScanner) setModel(name []byte) {
	if string(name) != u.model {
		u.model = string(name)
	}
}
