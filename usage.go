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
	*u = usageScanner{stream: stream}
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
			u.model, u.modelErr = "", true
			if m, ok := modelName(v); whole && ok {
				u.model, u.modelErr = m, false
			}
			continue
		}
		u.tokens, u.known, u.usageErrs = [numTokenTypes]int64{}, [numTokenTypes]bool{}, 1
		var c *usageCounts // null stays nil
		if whole && json.Unmarshal(v, &c) == nil {
			u.usageErrs = u.addUsage(c)
		}
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
					u.data = make([]byte, 0, 1<<10) // holds the usual line
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

// usageCounts is a usage object as the API sends it, each count raw:
// tokenCount reads it. Other fields (cache_creation, server_tool_use,
// service_tier) are not read. As everywhere in encoding/json, a key that
// differs from a field's only in case fills it too.
type usageCounts struct {
	InputTokens              json.RawMessage `json:"input_tokens"`
	OutputTokens             json.RawMessage `json:"output_tokens"`
	CacheReadInputTokens     json.RawMessage `json:"cache_read_input_tokens"`
	CacheCreationInputTokens json.RawMessage `json:"cache_creation_input_tokens"`
}

// sseData is what the scanner reads of a data line it keeps: message_start
// carries the model and the usage so far in "message", message_delta the
// cumulative usage beside it.
type sseData struct {
	Type    string `json:"type"`
	Message struct {
		Model json.RawMessage `json:"model"`
		Usage *usageCounts    `json:"usage"`
	} `json:"message"`
	Usage *usageCounts `json:"usage"`
}

// readData decodes a kept data line: a line that is not JSON of that shape
// is one parse error; one whose type is neither message_start nor
// message_delta is ignored.
func (u *usageScanner) readData(line []byte) {
	var d sseData
	if json.Unmarshal(line, &d) != nil {
		u.errs++
		return
	}
	switch d.Type {
	case "message_start":
		if d.Message.Model != nil {
			if m, ok := modelName(d.Message.Model); ok {
				u.model = m
			} else {
				u.errs++
			}
		}
		u.errs += u.addUsage(d.Message.Usage)
	case "message_delta":
		u.errs += u.addUsage(d.Usage)
	}
}

// addUsage takes the counts c gives (nil gives none): each replaces the
// count known before, as message_delta's cumulative counts replace
// message_start's. It returns how many counts were malformed.
func (u *usageScanner) addUsage(c *usageCounts) (errs int) {
	if c == nil {
		return 0
	}
	raw := [numTokenTypes]json.RawMessage{
		tokenInput:         c.InputTokens,
		tokenOutput:        c.OutputTokens,
		tokenCacheRead:     c.CacheReadInputTokens,
		tokenCacheCreation: c.CacheCreationInputTokens,
	}
	for t, v := range raw {
		n, known, bad := tokenCount(v)
		if bad {
			errs++
		}
		if known {
			u.tokens[t], u.known[t] = n, true
		}
	}
	return errs
}

// tokenCount reads a count: a JSON number that is a non-negative integer
// within int64, without fraction, exponent or sign. Absent (empty) or null
// is unknown, not malformed; anything else (-1, 1.5, 1e3, "12", true) is
// malformed. v comes from encoding/json, so it is one valid JSON value.
func tokenCount(v []byte) (n int64, known, bad bool) {
	if len(v) == 0 || string(v) == "null" {
		return 0, false, false
	}
	for _, c := range v {
		d := int64(c - '0')
		if c < '0' || c > '9' || n > (math.MaxInt64-d)/10 {
			return 0, false, true
		}
		n = n*10 + d
	}
	return n, true, false
}

// modelName reads a model name: a JSON string (null is not one) of at most
// maxModel bytes once unescaped.
func modelName(v []byte) (string, bool) {
	var s string
	if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil || len(s) > maxModel {
		return "", false
	}
	return s, true
}
