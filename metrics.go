package main

import (
	"bytes"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// errorType is the cause of an error response the proxy generated itself,
// the error_type label of proxy_upstream_errors_total.
type errorType uint8

const (
	errTypeTimeout        errorType = iota // label "timeout": 504 after the last phase-2 attempt timed out
	errTypeConnection                      // label "connection": 502, the upstream could not be reached
	errTypeInvalidRequest                  // label "invalid_request": 400, 408, 413, 431: the request broke a limit
	errTypeOverloaded                      // label "overloaded": 503, the proxy refused load it has no room for

	numErrorTypes = 4 // the number of errorType values above
)

// errorTypeOrder lists the errorType values in the exposition order, sorted
// by their label.
var errorTypeOrder = [numErrorTypes]errorType{errTypeConnection, errTypeInvalidRequest, errTypeOverloaded, errTypeTimeout}

// streamErrorOrder lists the error_type values of proxy_stream_errors_total,
// sorted by label: a cut stream is never an invalid request.
var streamErrorOrder = [...]errorType{errTypeConnection, errTypeTimeout}

// errorTypeLabels maps an errorType to its error_type label value.
var errorTypeLabels = [numErrorTypes]string{
	errTypeTimeout:        "timeout",
	errTypeConnection:     "connection",
	errTypeInvalidRequest: "invalid_request",
	errTypeOverloaded:     "overloaded",
}

// waitKind is what a proxied request waits for, the "for" label of
// proxy_requests_waiting. The constants are in label order.
type waitKind uint8

const (
	waitBodyBudget waitKind = iota // "body_budget": room for its body
	waitSlot                       // "slot": one of max_connections
	numWaits
)

var waitLabels = [numWaits]string{waitBodyBudget: "body_budget", waitSlot: "slot"}

// refusal is why the proxy refused a request by one of its own limits, the
// reason label of proxy_refused_total. The constants are in label order.
type refusal uint8

const (
	refuseBodyBudget      refusal = iota // 503: no room for the body within timeout_secs
	refuseBodyTooLarge                   // 413: over max_body_bytes
	refuseBodyTooSlow                    // 408: stalled, or under 1 KiB/s
	refuseStoppedReading                 // 499: the response made no progress for timeout_secs
	refuseHeadersTooLarge                // 431: over 32 KiB of headers
	refuseOverloaded                     // 503: memory near its limit
	refuseTooManyConns                   // 503: over the client connection bound
	refuseTooManyHeaders                 // 431: over 100 header fields
	numRefusals
)

var refusalLabels = [numRefusals]string{
	refuseBodyBudget:      "body_budget_timeout",
	refuseBodyTooLarge:    "body_too_large",
	refuseBodyTooSlow:     "body_too_slow",
	refuseStoppedReading:  "client_stopped_reading",
	refuseHeadersTooLarge: "headers_too_large",
	refuseOverloaded:      "overloaded",
	refuseTooManyConns:    "too_many_connections",
	refuseTooManyHeaders:  "too_many_headers",
}

// methodLabels holds the method label values, sorted by name; the index of a
// label is what methodIndex returns. OTHER stands for every non-standard
// method, so a client cannot create series at will (SPEC "Endpoints").
var methodLabels = [...]string{
	"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "OTHER", "PATCH", "POST", "PUT", "TRACE",
}

// numMethods is the number of method label values: nine standard methods plus OTHER.
const numMethods = len(methodLabels)

// methodIndex returns the index in methodLabels of the label for the request
// method m. The match is exact and case-sensitive, as net/http passes the
// method through unchanged; anything else is OTHER (a method named "OTHER"
// is counted there too). It does not allocate.
func methodIndex(m string) int {
	for i, label := range methodLabels {
		if label == m {
			return i
		}
	}
	return otherMethod
}

// otherMethod is the index of "OTHER" in methodLabels.
var otherMethod = slices.Index(methodLabels[:], "OTHER")

// Status codes are kept in fixed arrays indexed by code. net/http only sends
// codes in 100..999 (WriteHeader panics on anything else), so a code outside
// that range can only come from a caller's bug; it is recorded as 999, a code
// no real server sends, so it stands out on a dashboard instead of
// disappearing or posing as a real status.
const (
	minStatus   = 100                       // lowest code net/http accepts
	maxStatus   = 999                       // highest code net/http accepts; also the code for out-of-range values
	numStatuses = maxStatus - minStatus + 1 // 900 slots
)

// statusIndex returns the slot of the status code s in the per-status arrays.
func statusIndex(s int) int {
	if s < minStatus || s > maxStatus {
		s = maxStatus
	}
	return s - minStatus
}

// durationBounds are the upper bounds (inclusive, Prometheus "le") of the
// proxy_request_duration_seconds buckets, from SPEC "Endpoints": 5 ms for a
// quick error up to 60 s, the default timeout_secs. Longer requests (streams
// may last hours) land only in +Inf.
var durationBounds = [...]time.Duration{
	5 * time.Millisecond,
	10 * time.Millisecond,
	25 * time.Millisecond,
	50 * time.Millisecond,
	100 * time.Millisecond,
	250 * time.Millisecond,
	500 * time.Millisecond,
	1 * time.Second,
	2500 * time.Millisecond,
	5 * time.Second,
	10 * time.Second,
	30 * time.Second,
	60 * time.Second,
}

// numBuckets counts the histogram buckets: one per bound plus +Inf.
const numBuckets = len(durationBounds) + 1

// bucketIndex returns the bucket of a request that took d: the first bound
// d does not exceed, or the +Inf bucket.
func bucketIndex(d time.Duration) int {
	for i, b := range durationBounds {
		if d <= b {
			return i
		}
	}
	return len(durationBounds)
}

// histogram is the proxy_request_duration_seconds data of one status code.
// Its count is the sum of its buckets, so a scrape always sees the +Inf
// bucket equal to _count.
type histogram struct {
	buckets  [numBuckets]atomic.Uint64 // non-cumulative; the last one is +Inf
	sumNanos atomic.Uint64             // total duration in nanoseconds (overflows after 584 years)
}

// metrics holds every counter of the proxy. Updates are lock-free and
// allocation-free: each series is a fixed atomic counter, so concurrent
// requests never wait on each other's bookkeeping. The fixed arrays take
// about 180 KB (900 statuses × (10 methods + 15 histogram words) × 8 bytes);
// a scrape scans them in a few microseconds.
//
// requests_served and errors_total of /health are sums over the same
// counters, so they always agree with /metrics.
//
// The zero value is not ready for use; call newMetrics.
type metrics struct {
	// requests is proxy_requests_total, indexed by statusIndex and methodIndex.
	requests [numStatuses][numMethods]atomic.Uint64
	// durations is proxy_request_duration_seconds, indexed by statusIndex.
	durations [numStatuses]histogram
	// upstreamErrors is proxy_upstream_errors_total, indexed by errorType.
	upstreamErrors [numErrorTypes]atomic.Uint64
	// streamErrors is proxy_stream_errors_total, indexed by errorType
	// (timeout and connection only).
	streamErrors [numErrorTypes]atomic.Uint64
	// The gauges of the proxy's queues and the counter of its refusals
	// (SPEC: Limits under abuse), kept by their owners.
	inFlight    atomic.Int64               // proxy_requests_in_flight: proxied requests holding a slot
	waiting     [numWaits]atomic.Int64     // proxy_requests_waiting{for}
	bodyBudget  atomic.Int64               // proxy_body_budget_bytes_in_use
	clientConns atomic.Int64               // proxy_client_connections
	refused     [numRefusals]atomic.Uint64 // proxy_refused_total{reason}
	plan        *plan                      // the anthropic_* families
	process     processMetrics             // the go_* and process_* families
	// bufs holds *bytes.Buffer for ServeHTTP: scrapes repeat every few
	// seconds, and the output size is bounded (1.4 MB if all 9,000 series exist).
	bufs sync.Pool
}

// newMetrics returns empty metrics.
func newMetrics() *metrics {
	m := &metrics{plan: newPlan(), process: newProcessMetrics()}
	m.bufs.New = func() any { return new(bytes.Buffer) }
	return m
}

// observe records one finished proxied request: proxy_requests_total{status,method},
// proxy_request_duration_seconds{status}, and requests_served. method is the raw request method
// (anything other than the nine standard methods counts as "OTHER"). Must be allocation-free and lock-free.
// A negative d counts as 0.
func (m *metrics) observe(method string, status int, d time.Duration) {
	s := statusIndex(status)
	m.requests[s][methodIndex(method)].Add(1)
	d = max(d, 0)
	h := &m.durations[s]
	h.buckets[bucketIndex(d)].Add(1)
	h.sumNanos.Add(uint64(d))
}

// upstreamError counts proxy_upstream_errors_total{error_type} and errors_total. Allocation-free.
// An unknown t is ignored.
func (m *metrics) upstreamError(t errorType) {
	if int(t) < len(m.upstreamErrors) {
		m.upstreamErrors[t].Add(1)
	}
}

// streamError counts proxy_stream_errors_total{error_type}: a response cut
// after its headers were sent, because the upstream went silent for
// timeout_secs (errTypeTimeout) or failed (errTypeConnection). Such a request already
// has its status, so it is not one of the proxy's own error responses and
// not in errors_total. Allocation-free; an unknown t is ignored.
func (m *metrics) streamError(t errorType) {
	if int(t) < len(m.streamErrors) {
		m.streamErrors[t].Add(1)
	}
}

// refuse counts proxy_refused_total{reason}. Allocation-free.
func (m *metrics) refuse(r refusal) {
	if int(r) < len(m.refused) {
		m.refused[r].Add(1)
	}
}

// requestsServed returns the number of proxied requests observed so far,
// the sum of proxy_requests_total.
func (m *metrics) requestsServed() uint64 {
	var n uint64
	for s := range m.requests {
		for i := range m.requests[s] {
			n += m.requests[s][i].Load()
		}
	}
	return n
}

// errorsTotal returns the number of error responses the proxy generated
// itself, the sum of proxy_upstream_errors_total.
func (m *metrics) errorsTotal() uint64 {
	var n uint64
	for i := range m.upstreamErrors {
		n += m.upstreamErrors[i].Load()
	}
	return n
}

// Metric family names and help texts, in exposition (name) order.
const (
	budgetName   = "proxy_body_budget_bytes_in_use"
	budgetHelp   = "Bytes of the shared request body budget held by buffered bodies."
	connsName    = "proxy_client_connections"
	connsHelp    = "Open client connections."
	refusedName  = "proxy_refused_total"
	refusedHelp  = "Requests refused by the proxy's own limits, by reason."
	durationName = "proxy_request_duration_seconds"
	durationHelp = "Time from receiving a proxied request until its response was finished, in seconds, by final status code."
	inFlightName = "proxy_requests_in_flight"
	inFlightHelp = "Proxied requests holding one of max_connections slots."
	requestsName = "proxy_requests_total"
	requestsHelp = "Proxied requests by final status code (499: the client left) and method (OTHER: any non-standard method)."
	waitingName  = "proxy_requests_waiting"
	waitingHelp  = "Proxied requests waiting, by what for: a slot, or room for their body."
	streamName   = "proxy_stream_errors_total"
	streamHelp   = "Proxied responses cut after their headers were sent: timeout (the upstream was silent for timeout_secs), connection (the upstream failed)."
	errorsName   = "proxy_upstream_errors_total"
	errorsHelp   = "Error responses generated by the proxy itself: invalid_request (400, 408, 413, 431), connection (502), overloaded (503), timeout (504)."
)

// writePrometheus appends every metric to b in the Prometheus text format
// 0.0.4: families sorted by name, each with # HELP and # TYPE, even before
// any traffic. Only observed statuses and status/method pairs are written;
// the three error_type series always are, at 0 until the first error, so an
// alert on their rate works from startup. Series are sorted by status, then
// method (status codes are three digits, so text order is numeric order).
// Each value is read once, without locks; a histogram's count is the sum of
// its buckets as read, so its +Inf bucket always equals _count.
func (m *metrics) writePrometheus(b *bytes.Buffer) {
	m.plan.writePrometheus(b) // anthropic_* < go_* < process_* < proxy_*
	m.process.writeGo(b)
	m.process.writeProcess(b)
	writeFamilyHeader(b, budgetName, budgetHelp, "gauge")
	writeSample(b, budgetName, "", "", m.bodyBudget.Load())
	writeFamilyHeader(b, connsName, connsHelp, "gauge")
	writeSample(b, connsName, "", "", m.clientConns.Load())
	writeFamilyHeader(b, refusedName, refusedHelp, "counter")
	for r := range m.refused {
		writeSample(b, refusedName, "reason", refusalLabels[r], int64(m.refused[r].Load()))
	}

	writeFamilyHeader(b, durationName, durationHelp, "histogram")
	for s := range m.durations {
		m.writeHistogram(b, s)
	}

	writeFamilyHeader(b, inFlightName, inFlightHelp, "gauge")
	writeSample(b, inFlightName, "", "", m.inFlight.Load())

	writeFamilyHeader(b, requestsName, requestsHelp, "counter")
	for s := range m.requests {
		for i := range m.requests[s] {
			v := m.requests[s][i].Load()
			if v == 0 {
				continue
			}
			b.WriteString(requestsName)
			writeStatusLabel(b, '{', s)
			writeLabel(b, ',', "method", methodLabels[i])
			b.WriteString("} ")
			writeUint(b, v)
		}
	}

	writeFamilyHeader(b, waitingName, waitingHelp, "gauge")
	for w := range m.waiting {
		writeSample(b, waitingName, "for", waitLabels[w], m.waiting[w].Load())
	}

	writeFamilyHeader(b, streamName, streamHelp, "counter")
	writeErrorSeries(b, streamName, streamErrorOrder[:], &m.streamErrors)

	writeFamilyHeader(b, errorsName, errorsHelp, "counter")
	writeErrorSeries(b, errorsName, errorTypeOrder[:], &m.upstreamErrors)
}

// writeSample appends the line name{label="value"} v, or name v when label
// is empty.
func writeSample(b *bytes.Buffer, name, label, value string, v int64) {
	b.WriteString(name)
	if label != "" {
		writeLabel(b, '{', label, value)
		b.WriteByte('}')
	}
	b.WriteByte(' ')
	b.Write(strconv.AppendInt(b.AvailableBuffer(), v, 10))
	b.WriteByte('\n')
}

// writeErrorSeries appends one name{error_type="..."} line for each type in
// order, zeros included.
func writeErrorSeries(b *bytes.Buffer, name string, order []errorType, counts *[numErrorTypes]atomic.Uint64) {
	for _, t := range order {
		b.WriteString(name)
		writeLabel(b, '{', "error_type", errorTypeLabels[t])
		b.WriteString("} ")
		writeUint(b, counts[t].Load())
	}
}

// writeHistogram appends the _bucket, _sum and _count lines of the status in
// slot s, or nothing if no request ended with that status.
func (m *metrics) writeHistogram(b *bytes.Buffer, s int) {
	h := &m.durations[s]
	var counts [numBuckets]uint64
	var total uint64
	for i := range h.buckets {
		counts[i] = h.buckets[i].Load()
		total += counts[i]
	}
	if total == 0 {
		return
	}
	sum := nanosToSeconds(h.sumNanos.Load())

	var cum uint64
	for i, c := range counts {
		cum += c
		b.WriteString(durationName)
		b.WriteString("_bucket")
		writeStatusLabel(b, '{', s)
		b.WriteString(`,le="`)
		if i < len(durationBounds) {
			b.Write(strconv.AppendFloat(b.AvailableBuffer(), durationBounds[i].Seconds(), 'g', -1, 64))
		} else {
			b.WriteString("+Inf")
		}
		b.WriteString(`"} `)
		writeUint(b, cum)
	}
	b.WriteString(durationName)
	b.WriteString("_sum")
	writeStatusLabel(b, '{', s)
	b.WriteString("} ")
	b.Write(strconv.AppendFloat(b.AvailableBuffer(), sum, 'g', -1, 64))
	b.WriteByte('\n')
	b.WriteString(durationName)
	b.WriteString("_count")
	writeStatusLabel(b, '{', s)
	b.WriteString("} ")
	writeUint(b, total)
}

// nanosToSeconds converts a nanosecond sum to seconds, splitting off the
// whole seconds first so the fraction keeps its precision (as
// time.Duration.Seconds does, without its 292-year limit).
func nanosToSeconds(ns uint64) float64 {
	const perSecond = uint64(time.Second)
	return float64(ns/perSecond) + float64(ns%perSecond)/1e9
}

// writeFamilyHeader appends the # HELP and # TYPE lines of a family.
func writeFamilyHeader(b *bytes.Buffer, name, help, typ string) {
	b.WriteString("# HELP ")
	b.WriteString(name)
	b.WriteByte(' ')
	writeEscaped(b, help, false)
	b.WriteString("\n# TYPE ")
	b.WriteString(name)
	b.WriteByte(' ')
	b.WriteString(typ)
	b.WriteByte('\n')
}

// writeStatusLabel appends sep and the status label of slot s.
func writeStatusLabel(b *bytes.Buffer, sep byte, s int) {
	var digits [3]byte // codes are 100..999
	writeLabel(b, sep, "status", string(strconv.AppendInt(digits[:0], int64(s+minStatus), 10)))
}

// writeLabel appends sep and name="value", escaping value.
func writeLabel(b *bytes.Buffer, sep byte, name, value string) {
	b.WriteByte(sep)
	b.WriteString(name)
	b.WriteString(`="`)
	writeEscaped(b, value, true)
	b.WriteByte('"')
}

// writeUint appends v and the newline ending a sample line.
func writeUint(b *bytes.Buffer, v uint64) {
	b.Write(strconv.AppendUint(b.AvailableBuffer(), v, 10))
	b.WriteByte('\n')
}

// writeEscaped appends s escaped as the text format 0.0.4 requires: in HELP
// text a backslash and a newline become \\ and \n; in a label value
// (quote true) a double quote also becomes \" (prometheus/common
// expfmt/text_create.go).
func writeEscaped(b *bytes.Buffer, s string, quote bool) {
	start := 0 // s[start:i] is still to be written unchanged
	for i := 0; i < len(s); i++ {
		var esc string
		switch c := s[i]; {
		case c == '\\':
			esc = `\\`
		case c == '\n':
			esc = `\n`
		case c == '"' && quote:
			esc = `\"`
		default:
			continue
		}
		b.WriteString(s[start:i])
		b.WriteString(esc)
		start = i + 1
	}
	b.WriteString(s[start:])
}

// contentTypeText is the media type of the text exposition format 0.0.4.
const contentTypeText = "text/plain; version=0.0.4; charset=utf-8"

// ServeHTTP serves GET and HEAD /metrics (the router has checked method and
// path). The whole exposition is rendered first and sent in one write with
// its Content-Length; HEAD gets the same headers and no body.
func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b := m.bufs.Get().(*bytes.Buffer)
	defer m.bufs.Put(b)
	b.Reset()
	m.writePrometheus(b)

	h := w.Header()
	h.Set("Content-Type", contentTypeText)
	h.Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		// An error means the scraper left; there is nobody to tell.
		w.Write(b.Bytes())
	}
}
