package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The life of one proxied request, top to bottom:
//
//  1. serveProxy gives it a request ID and a status-recording writer, and
//     defers finish, which writes the one log line and the metrics.
//  2. It waits for a concurrency slot (max_connections).
//  3. readBody reads the whole body into memory, bounded by max_body_bytes,
//     by the shared body budget and by a stall deadline, so that a retry
//     can replay it; modifyResponse releases it once headers arrive.
//  4. stripHopByHop removes hop-by-hop and forwarding headers from the
//     client's request, before ReverseProxy sees it.
//  5. ReverseProxy calls rewrite (upstream URL, raw query, injected
//     headers), then retryTransport (phase-2 timeouts retried), then
//     modifyResponse (idle timer on the body) or proxyError (the one place
//     that turns a failure into a JSON error).
//  6. The body streams through recorder, flushed after every write.

// exchange is the per-request state shared by the ReverseProxy hooks, in
// one allocation. It is the outgoing request's context itself (wrapping
// the client's), so the hooks find it with exchangeFrom; each upstream
// attempt derives a context of its own from it, cancellable with a cause.
// Everything in it is touched only by the request's handler goroutine,
// except cancel, which timer goroutines call, and timeout, which the
// transport's goroutine reads (sendBody); both are set before either
// starts.
type exchange struct {
	context.Context                         // the client's request context
	attempt         context.Context         // the current upstream attempt's context; nil before the first
	cancel          context.CancelCauseFunc // cancels attempt, with a cause
	client          context.Context         // the client connection's context
	id              string                  // "req_" + 32 hex digits
	attempts        int                     // upstream attempts made
	upstreamID      string                  // upstream "request-id" response header
	err             error                   // what failed, for the log line
	answered        bool                    // the proxy wrote its own error response
	rec             recorder                // wraps the client's ResponseWriter
	resBody         idleBody                // wraps the upstream's response body
	reqBody         []byte                  // the buffered request body; nil once headers arrived
	reqReader       bodyReader              // reads reqBody for ReverseProxy
	stall           stallReader             // reads the client's body with a deadline
	reserved        int64                   // bytes of the body budget held
	sending         *sendBody               // the current attempt's watched body, if any
	timeout         time.Duration           // timeout_secs
	headerTimeout   time.Duration           // phase 2: the wait for response headers, from the write
	clientDeadline  time.Time               // phase 2 lasts at least until then; zero for none
	clientWait      time.Duration           // the client's own timeout behind clientDeadline
	maxAttempts     int                     // attempts a phase-2 timeout allows
}

type exchangeKey struct{}

// Value makes the exchange findable from the contexts derived from it.
func (x *exchange) Value(key any) any {
	if key == (exchangeKey{}) {
		return x
	}
	return x.Context.Value(key)
}

func exchangeFrom(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

// getBody is the outgoing request's GetBody: a fresh reader of the buffered
// body for each attempt. A small body is io.NopCloser over a *bytes.Reader,
// which net/http knows to be in memory and sends in one write with the
// headers. A larger body may not fit in the socket and HTTP/2 flow-control
// buffers, so an upstream that stops reading it could hold the request
// before any of the timeouts starts; its reader watches for that.
func (x *exchange) getBody() (io.ReadCloser, error) {
	r := bytes.NewReader(x.reqBody)
	if len(x.reqBody) < sendWatchMin {
		return io.NopCloser(r), nil
	}
	sb := &sendBody{Reader: r, x: x, cancel: x.cancel}
	sb.timer = time.AfterFunc(x.timeout, sb.expire)
	sb.timer.Stop() // armed by each Read: connecting is not stalling
	x.sending = sb
	return sb, nil
}

// sendWatchMin is the body size from which sendBody watches the upload:
// below it (32 KiB, half the default HTTP/2 stream window) the body is
// always taken in whole by the kernel or the HTTP/2 window.
const sendWatchMin = 32 << 10

// errSendStalled is the cancellation cause when the upstream takes no byte
// of the request body for timeout_secs.
var errSendStalled = errors.New("upstream stopped reading the request body")

// sendBody is a request body the transport reads from its own goroutine.
// If timeout_secs pass between two Reads (the write to the upstream is
// blocked), the exchange is cancelled. Once the response headers arrive
// the watch ends (done), whatever the transport still writes.
type sendBody struct {
	*bytes.Reader
	x      *exchange
	cancel context.CancelCauseFunc // the attempt's
	timer  *time.Timer
	done   atomic.Bool
}

func (sb *sendBody) Read(p []byte) (int, error) {
	n, err := sb.Reader.Read(p)
	if err != nil || sb.done.Load() {
		sb.timer.Stop()
	} else {
		sb.timer.Reset(sb.x.timeout)
	}
	return n, err
}

func (sb *sendBody) Close() error { sb.stop(); return nil }

func (sb *sendBody) stop() {
	sb.done.Store(true)
	sb.timer.Stop()
}

func (sb *sendBody) expire() {
	if !sb.done.Load() {
		sb.cancel(errSendStalled)
	}
}

// bodyReader is a bytes.Reader with a no-op Close.
type bodyReader struct{ bytes.Reader }

func (*bodyReader) Close() error { return nil }

// errIdleTimeout is the cancellation cause when a response body stays silent
// for timeout_secs (SPEC: phase 3, reset by every chunk).
var errIdleTimeout = errors.New("upstream stream idle timeout")

// errClientGone marks requests whose client left before they were proxied.
var errClientGone = errors.New("client went away")

// errCutAtShutdown marks requests still open when the drain timeout ran out.
var errCutAtShutdown = errors.New("cut at shutdown: still open when the drain timeout ran out")

// errOpaqueTarget marks requests whose target has no path to forward.
var errOpaqueTarget = errors.New("request target is not a path")

// serveProxy handles every request that is not a local endpoint.
func (s *server) serveProxy(w http.ResponseWriter, r *http.Request) {
	s.inflight.Add(1)
	defer s.inflight.Done()
	x := &exchange{id: newRequestID(), client: r.Context(), timeout: s.cfg.Timeout}
	x.rec.ResponseWriter = w
	start := time.Now()
	defer s.finish(x, r, start)

	// A target with no path ("http:foo": a URL without "//") cannot be
	// joined to upstream_url; sent on, it would be an invalid request line.
	if r.URL.Opaque != "" {
		s.failRequest(&x.rec, x, http.StatusBadRequest, errInvalidRequest, "request target must be a path", errOpaqueTarget)
		return
	}

	// Take a slot before reading the body (SPEC: Concurrency). A client that
	// gives up while waiting is dropped without a response.
	waited := false
	select {
	case s.slots <- struct{}{}:
	default:
		waited = true
		select {
		case s.slots <- struct{}{}:
		case <-r.Context().Done():
			x.err = errClientGone
			return
		}
	}
	defer func() { <-s.slots }()

	var err error
	x.reqBody, x.reserved, err = s.readBody(x, w, r)
	defer func() { s.budget.release(x.reserved) }()
	if err != nil {
		var tooLarge *http.MaxBytesError
		switch {
		case errors.As(err, &tooLarge):
			s.failRequest(&x.rec, x, http.StatusRequestEntityTooLarge, errInvalidRequest,
				"request body exceeds "+strconv.FormatInt(s.cfg.MaxBodyBytes, 10)+" bytes", err)
		case errors.Is(err, os.ErrDeadlineExceeded):
			s.failRequest(&x.rec, x, http.StatusBadRequest, errInvalidRequest,
				"request body stalled: no data for "+formatSeconds(s.cfg.Timeout), err)
		case isClientGone(r.Context(), err):
			x.err = err
		default:
			s.failRequest(&x.rec, x, http.StatusBadRequest, errInvalidRequest, "cannot read request body: "+err.Error(), err)
		}
		return
	}

	// net/http notices a client's disconnect only once the body has been
	// read, so a client that gave up while its request waited for a slot
	// is seen just now: give that notice a moment before sending upstream.
	if waited && (r.Context().Err() != nil || len(x.reqBody) > 0 && clientLeft(r.Context())) {
		x.err = errClientGone
		return
	}

	s.phase2(x, r, start)
	stripHopByHop(r.Header)

	x.Context = r.Context()
	defer func() {
		if x.cancel != nil {
			x.cancel(nil) // the last attempt's context; the others are cancelled already
		}
	}()
	out := r.WithContext(x)
	out.ContentLength = int64(len(x.reqBody))
	out.TransferEncoding = nil
	out.Body, out.GetBody = http.NoBody, nil
	if len(x.reqBody) > 0 {
		x.reqReader.Reset(x.reqBody)
		out.Body, out.GetBody = &x.reqReader, x.getBody
	}
	s.proxy.ServeHTTP(&x.rec, out)
}

// clientLeft reports whether ctx, the client connection's context, ends
// within a millisecond.
func clientLeft(ctx context.Context) bool {
	t := time.NewTimer(time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return true
	case <-t.C:
		return false
	}
}

// releaseBody drops the buffered request body once the response headers
// have arrived: no attempt follows, so a long stream need not hold its
// request's memory or its share of the body budget.
func (s *server) releaseBody(x *exchange, res *http.Response) {
	if x.sending != nil {
		x.sending.stop()
	}
	x.reqBody = nil
	x.reqReader.Reset(nil)
	if res.Request != nil && res.Request.Body != nil {
		res.Request.Body = http.NoBody // the attempt's reader; the transport has its own reference
	}
	s.budget.release(x.reserved)
	x.reserved = 0
}

// finish records the request once, whatever happened: one log line, the
// request metrics, and the status. It runs deferred, so it also sees the
// http.ErrAbortHandler panic with which ReverseProxy leaves a stream that
// failed after its headers were sent; that panic is passed on so net/http
// aborts the client connection.
func (s *server) finish(x *exchange, r *http.Request, start time.Time) {
	rec := &x.rec
	p := recover()
	if p != nil && p != http.ErrAbortHandler {
		// A bug, not a fault of the peers: keep the process up, answer 500
		// if nothing was sent yet, and never print a stack trace.
		x.err = errors.New("internal error: " + panicString(p))
		if rec.status == 0 {
			s.writeError(rec, x, http.StatusInternalServerError, "internal proxy error")
		} else {
			p = http.ErrAbortHandler
		}
	}
	if x.err == nil && rec.writeErr != nil {
		x.err = rec.writeErr
	}

	status := rec.status
	// net/http cancels the client's context on any read error, a stalled
	// body included: a request the proxy answered itself is not "gone".
	gone := x.err != nil && x.client.Err() != nil && !x.answered
	if gone && s.cutting.Load() {
		// The proxy closed the connection at the end of the drain; the
		// client did not leave.
		gone = false
		x.err = errCutAtShutdown
		if status == 0 {
			status = http.StatusServiceUnavailable // nothing was sent
		}
	}
	switch {
	case gone || x.err == errClientGone:
		status = 499 // client closed request; never counted as an error
	case status == 0:
		status = http.StatusOK // ReverseProxy always writes a header; kept total
	}
	d := time.Since(start)
	s.metrics.observe(r.Method, status, d)

	level := slog.LevelInfo
	if x.err != nil && !gone && x.err != errClientGone {
		level = slog.LevelWarn
	}
	if s.log.Enabled(context.Background(), level) {
		attrs := make([]slog.Attr, 0, 8)
		attrs = append(attrs,
			slog.String("request_id", x.id),
			slog.String("method", r.Method),
			slog.String("path", r.URL.Path),
			slog.Int("status", status),
			slog.Float64("duration_ms", float64(d.Microseconds())/1000),
		)
		if x.upstreamID != "" {
			attrs = append(attrs, slog.String("upstream_request_id", x.upstreamID))
		}
		if x.attempts > 0 {
			attrs = append(attrs, slog.Int("attempts", x.attempts))
		}
		if x.err != nil {
			attrs = append(attrs, slog.String("error", x.err.Error()))
		}
		s.log.LogAttrs(context.Background(), level, "request", attrs...)
	}
	if p != nil {
		panic(p)
	}
}

func panicString(p any) string {
	switch v := p.(type) {
	case error:
		return v.Error()
	case string:
		return v
	}
	return "panic"
}

// isClientGone reports whether err while reading the request body means the
// client disconnected (rather than sent something malformed).
func isClientGone(ctx context.Context, err error) bool {
	if ctx.Err() != nil || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne)
}

// readBody reads the request body into memory so that every attempt can
// send the same bytes. It reserves room in the shared body budget first:
// the declared Content-Length, or max_body_bytes for a chunked body (the
// unused part is returned once the body is read). It returns the bytes
// still reserved, which the caller must release, also after an error.
func (s *server) readBody(x *exchange, w http.ResponseWriter, r *http.Request) (body []byte, reserved int64, err error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil, 0, nil
	}
	limit := s.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		// Refused before a byte is read, so the client is never sent
		// 100 Continue and the upstream is never contacted.
		return nil, 0, &http.MaxBytesError{Limit: limit}
	}
	// A client that stops sending its body for timeout_secs is given up
	// on: a stalled upload must not hold a slot and its share of the body
	// budget for ever (there is no ReadTimeout, which would cut streams).
	src := &x.stall
	*src = stallReader{r: r.Body, timeout: s.cfg.Timeout}
	src.conn, _ = w.(readDeadliner)
	defer func() {
		if err == nil {
			src.setDeadline(time.Time{}) // the connection lives on
		} else {
			// net/http would wait to drain the rest of the body before
			// answering; a failed body is not drained, the connection
			// closes after the answer.
			src.setDeadline(time.Unix(1, 0))
		}
	}()
	if r.ContentLength >= 0 {
		// net/http stops the body at Content-Length, within the limit.
		if err := s.budget.acquire(r.Context(), r.ContentLength); err != nil {
			return nil, 0, err
		}
		body = make([]byte, r.ContentLength)
		_, err = io.ReadFull(src, body)
		return body, r.ContentLength, err
	}
	if err := s.budget.acquire(r.Context(), limit); err != nil {
		return nil, 0, err
	}
	body, err = io.ReadAll(http.MaxBytesReader(w, io.NopCloser(src), limit))
	s.budget.release(limit - int64(len(body)))
	return body, int64(len(body)), err
}

// stallReader moves the client connection's read deadline timeout ahead of
// every Read of the request body.
type stallReader struct {
	r       io.Reader
	conn    readDeadliner // nil if the ResponseWriter cannot set one
	timeout time.Duration
}

// readDeadliner is net/http's HTTP/1 ResponseWriter, which sets the client
// connection's read deadline.
type readDeadliner interface{ SetReadDeadline(time.Time) error }

func (sr *stallReader) setDeadline(t time.Time) {
	if sr.conn != nil {
		sr.conn.SetReadDeadline(t)
	}
}

func (sr *stallReader) Read(p []byte) (int, error) {
	sr.setDeadline(time.Now().Add(sr.timeout))
	return sr.r.Read(p)
}

// hopHeaders are the hop-by-hop headers of RFC 9110 section 7.6.1, plus the
// non-standard Proxy-Connection. They describe one connection and are never
// forwarded.
var hopHeaders = [...]string{
	"Connection",
	"Proxy-Connection",
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// stripHopByHop removes from a client's request header everything that must
// not reach the upstream: headers named in Connection (except Authorization,
// which always passes through), the hop-by-hop headers, client-sent
// Forwarded and X-Forwarded-*, and Expect (net/http already answered it with
// 100 Continue when the body was read; forwarding it could earn the client
// a second one). Done before ReverseProxy runs, so that it has nothing left
// to strip and re-adds neither "Te: trailers" nor an Upgrade.
func stripHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for token := range strings.SplitSeq(v, ",") {
			token = textproto.TrimString(token)
			if token != "" && !strings.EqualFold(token, "Authorization") {
				h.Del(token)
			}
		}
	}
	for _, k := range hopHeaders {
		delete(h, k)
	}
	delete(h, "Forwarded")
	delete(h, "Expect")
	for k := range h {
		if strings.HasPrefix(k, "X-Forwarded-") {
			delete(h, k)
		}
	}
}

// rewrite is ReverseProxy's Rewrite hook: it points the outgoing request at
// the upstream and applies the configured headers.
func (s *server) rewrite(pr *httputil.ProxyRequest) {
	// SetURL joins the upstream path with the request's escaped path and
	// clears Out.Host, so Host becomes the upstream host. The client can
	// only ever change the path: "//evil.example/x" stays a path.
	pr.SetURL(s.cfg.Upstream)
	// ReverseProxy drops query parameters it cannot parse ("c=%zz",
	// "a=1;b=2"); the upstream gets the query exactly as sent.
	pr.Out.URL.RawQuery = pr.In.URL.RawQuery
	// The asterisk-form target of "OPTIONS *" joins to the path "/*";
	// without a raw path, url.URL would send it re-encoded as "/%2A".
	if pr.In.URL.Path == "*" {
		pr.Out.URL.RawPath = strings.TrimSuffix(s.cfg.Upstream.EscapedPath(), "/") + "/*"
	}
	// ReverseProxy re-adds these for trailers and upgrades; stripHopByHop
	// already removed their cause, this keeps the rule literal.
	delete(pr.Out.Header, "Te")
	delete(pr.Out.Header, "Upgrade")
	delete(pr.Out.Header, "Connection")
	for i := range s.rules {
		s.rules[i].apply(pr.Out.Header)
	}
}

// headerRule is a HeaderRule prepared for the hot path.
type headerRule struct {
	key    string // canonical header key
	mode   HeaderMode
	value  string   // for append: the configured value as one line
	values []string // []string{value}, shared and never appended to in place
	tokens []string // for append: the configured tokens
}

func newHeaderRules(rules []HeaderRule) []headerRule {
	out := make([]headerRule, 0, len(rules))
	for _, r := range rules {
		hr := headerRule{key: http.CanonicalHeaderKey(r.Name), mode: r.Mode, value: r.Value}
		hr.values = []string{r.Value}[:1:1]
		for t := range strings.SplitSeq(r.Value, ",") {
			if t = textproto.TrimString(t); t != "" {
				hr.tokens = append(hr.tokens, t)
			}
		}
		out = append(out, hr)
	}
	return out
}

// apply changes h according to the rule's mode.
func (hr *headerRule) apply(h http.Header) {
	switch hr.mode {
	case HeaderSet:
		h[hr.key] = hr.values
	case HeaderRemove:
		delete(h, hr.key)
	case HeaderAppend:
		if client := h[hr.key]; len(client) > 0 {
			h[hr.key] = appendTokens(client, hr.value, hr.tokens)
		} else {
			h[hr.key] = hr.values
		}
	}
}

// appendTokens merges a comma-separated list header: the client's lines
// joined into one, in order, followed by each configured token the client
// did not send (compared case-insensitively). The client's own text is kept
// as it was written.
func appendTokens(client []string, value string, tokens []string) []string {
	line := ""
	for _, v := range client {
		if strings.Trim(v, " \t,") == "" {
			continue
		}
		if line != "" {
			line += ","
		}
		line += v
	}
	if line == "" {
		return []string{value}
	}
	missing := false
	for _, t := range tokens {
		if !hasToken(line, t) {
			line += "," + t
			missing = true
		}
	}
	if !missing && len(client) == 1 {
		return client
	}
	return []string{line}
}

// hasToken reports whether the comma-separated list contains token,
// ignoring case and the spaces around list elements.
func hasToken(list, token string) bool {
	for t := range strings.SplitSeq(list, ",") {
		if strings.EqualFold(textproto.TrimString(t), token) {
			return true
		}
	}
	return false
}

// errSwitchingProtocols refuses an upstream's 101 response: the proxy
// forwards no Upgrade header, so a protocol switch is never one the client
// asked for.
var errSwitchingProtocols = errors.New("protocol switch (101) refused: upgrades are not proxied")

// modifyResponse is ReverseProxy's ModifyResponse hook. It refuses a 101,
// notes the upstream's request-id and puts the idle timer on the response
// body.
func (s *server) modifyResponse(res *http.Response) error {
	if res.StatusCode == http.StatusSwitchingProtocols {
		// Returning an error makes ReverseProxy close the upstream
		// connection; its own upgrade path leaves it open when the
		// protocols do not match.
		return errSwitchingProtocols
	}
	x := exchangeFrom(res.Request.Context())
	if x == nil {
		return nil
	}
	x.upstreamID = res.Header.Get("Request-Id")
	s.releaseBody(x, res)
	if res.Body != nil && res.Body != http.NoBody {
		x.resBody = idleBody{rc: res.Body, x: x, metrics: s.metrics, timeout: s.cfg.Timeout}
		res.Body = &x.resBody
	}
	return nil
}

// idleBody cancels the upstream request when no byte arrives for timeout
// (SPEC: phase 3). The timer runs only while Read waits for the upstream,
// and restarts with every Read: a stream that keeps sending may last for
// hours, and a client that is slow to take the bytes (the write blocks)
// never makes the upstream look idle.
type idleBody struct {
	rc      io.ReadCloser
	x       *exchange
	metrics *metrics
	timer   *time.Timer // nil until the first Read
	timeout time.Duration
}

func (b *idleBody) expire() { b.x.cancel(errIdleTimeout) }

// Read passes data through. A failure is noted on the exchange for the log
// line and reported to ReverseProxy as context.Canceled, which makes it
// abort the client connection without logging a second, unrelated line.
func (b *idleBody) Read(p []byte) (int, error) {
	if b.timer == nil {
		b.timer = time.AfterFunc(b.timeout, b.expire)
	} else {
		b.timer.Reset(b.timeout)
	}
	n, err := b.rc.Read(p)
	b.timer.Stop()
	if err != nil && err != io.EOF {
		switch {
		case b.x.client.Err() != nil:
			b.x.err = errClientGone
		case context.Cause(b.x.attempt) == errIdleTimeout:
			b.x.err = errors.New("upstream stream idle for " + formatSeconds(b.timeout) + ", closed")
			b.metrics.streamError(errTimeout)
		default:
			b.x.err = errors.New("upstream stream failed: " + err.Error())
			b.metrics.streamError(errConnection)
		}
		return n, context.Canceled
	}
	return n, err
}

func (b *idleBody) Close() error {
	if b.timer != nil {
		b.timer.Stop()
	}
	return b.rc.Close()
}

// proxyError is ReverseProxy's ErrorHandler: every failure before the
// response headers ends here. It is the one place that classifies errors.
func (s *server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	x := exchangeFrom(r.Context())
	if x.client.Err() != nil {
		x.err = errClientGone // nothing is written to a gone client
		return
	}
	if err == errHeaderTimeout {
		msg := "upstream response timeout after " + formatSeconds(x.headerTimeout) + " (1 attempt)"
		switch {
		case !x.clientDeadline.IsZero():
			msg = "upstream response timeout: no response headers within the client's " +
				formatSeconds(x.clientWait) + " timeout (1 attempt)"
		case x.attempts > 1:
			msg = "upstream response timeout after " + formatSeconds(x.headerTimeout) +
				" (" + strconv.Itoa(x.attempts) + " attempts)"
		}
		s.failRequest(w, x, http.StatusGatewayTimeout, errTimeout, msg, err)
		return
	}
	if x.attempt != nil && context.Cause(x.attempt) == errSendStalled {
		msg := "upstream stopped reading the request body for " + formatSeconds(s.cfg.Timeout)
		s.failRequest(w, x, http.StatusGatewayTimeout, errTimeout, msg, errSendStalled)
		return
	}
	msg := "upstream connection failed: " + err.Error()
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "upstream closed the connection before sending response headers"
	}
	s.failRequest(w, x, http.StatusBadGateway, errConnection, msg, err)
}

// failRequest answers with a proxy error and counts it.
func (s *server) failRequest(w http.ResponseWriter, x *exchange, status int, kind errorType, msg string, err error) {
	x.err = err
	s.metrics.upstreamError(kind)
	s.writeError(w, x, status, msg)
}

// writeError writes the JSON error shape of SPEC.md: the API's own
// envelope, so the SDKs parse it like an API error.
func (s *server) writeError(w http.ResponseWriter, x *exchange, status int, msg string) {
	x.answered = true
	type detail struct {
		Type      string `json:"type"`
		Message   string `json:"message"`
		RequestID string `json:"request_id"`
	}
	type envelope struct {
		Type  string `json:"type"`
		Error detail `json:"error"`
	}
	kind := "proxy_error"
	if status == http.StatusRequestEntityTooLarge {
		// The API's type for a body over its limit: Claude Code then
		// advises the user instead of resending without beta features.
		kind = "request_too_large"
	}
	body, _ := json.Marshal(envelope{"error", detail{kind, msg, x.id}})
	body = append(body, '\n')
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	// As the API does: the SDKs show it as the error's request ID, and it
	// finds the request's log line.
	h.Set("Request-Id", x.id)
	if status == http.StatusGatewayTimeout {
		// The proxy already retried, or must not retry at all; tell the
		// Anthropic SDKs and Claude Code not to multiply the attempts.
		h.Set("X-Should-Retry", "false")
	}
	w.WriteHeader(status)
	w.Write(body)
}

// formatSeconds prints d as "60s" for whole seconds.
func formatSeconds(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return d.String()
}

// errHeaderTimeout is what an attempt returns when the upstream sent no
// response headers within the request's phase-2 wait; proxyError and
// retryTransport recognise it by identity.
var errHeaderTimeout = errors.New("timeout awaiting response headers")

// retryTransport sends each attempt with its phase-2 timer and retries an
// attempt whose upstream accepted the request but sent no response headers
// in time: the exchange's maxAttempts in all, pause apart, the same body
// each time (SPEC: Retries). Nothing else is retried.
type retryTransport struct {
	next  http.RoundTripper // with no ResponseHeaderTimeout of its own
	pause time.Duration     // 100 ms between attempts
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	x := exchangeFrom(req.Context())
	for n := 1; ; n++ {
		res, err := t.attempt(x, req, n)
		if err != errHeaderTimeout || n >= x.maxAttempts {
			return res, err
		}
		pause := time.NewTimer(t.pause)
		select {
		case <-pause.C:
		case <-req.Context().Done():
			pause.Stop()
			return nil, err
		}
	}
}

// attempt sends req once, as attempt n, in a context of its own. Its
// phase-2 timer starts when the request, body included, has been written,
// as Transport.ResponseHeaderTimeout's would, and ends when the headers
// arrive; if it fires first, the attempt is cancelled (over HTTP/1 its
// connection is closed, over HTTP/2 its stream reset) and errHeaderTimeout
// returned. A successful attempt's context lives on with the response
// body.
func (t *retryTransport) attempt(x *exchange, req *http.Request, n int) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	x.attempts, x.attempt, x.cancel = n, ctx, cancel
	hw := &headerWait{timeout: x.headerTimeout, deadline: x.clientDeadline, cancel: cancel}
	hw.trace.WroteRequest = hw.wrote
	out := req.WithContext(httptrace.WithClientTrace(ctx, &hw.trace))
	if req.GetBody != nil {
		// Every attempt, the first included, gets a fresh reader: the
		// transport may still hold the previous one, and it sends a
		// reader it knows to be in memory in the same write as the
		// headers.
		body, err := req.GetBody()
		if err != nil {
			cancel(nil)
			return nil, err
		}
		out.Body = body
	}
	res, err := t.next.RoundTrip(out)
	hw.stop()
	if err != nil {
		if context.Cause(ctx) == errHeaderTimeout {
			err = errHeaderTimeout
		}
		cancel(nil) // keeps a cause set before
	}
	return res, err
}

// headerWait is one attempt's phase-2 timer. wrote runs on the
// transport's goroutine, possibly after the headers have arrived; the
// mutex makes stop final.
type headerWait struct {
	trace    httptrace.ClientTrace
	timeout  time.Duration
	deadline time.Time // the timer runs at least until then
	cancel   context.CancelCauseFunc
	mu       sync.Mutex
	timer    *time.Timer
	stopped  bool
}

func (hw *headerWait) wrote(info httptrace.WroteRequestInfo) {
	if info.Err != nil {
		return // the attempt fails on its own
	}
	hw.mu.Lock()
	if !hw.stopped {
		hw.timer = time.AfterFunc(max(hw.timeout, time.Until(hw.deadline)), hw.expire)
	}
	hw.mu.Unlock()
}

func (hw *headerWait) expire() {
	hw.mu.Lock()
	if !hw.stopped {
		hw.cancel(errHeaderTimeout)
	}
	hw.mu.Unlock()
}

func (hw *headerWait) stop() {
	hw.mu.Lock()
	hw.stopped = true
	if hw.timer != nil {
		hw.timer.Stop()
	}
	hw.mu.Unlock()
}

// recorder remembers the status and any write error for the log line and
// the metrics, and flushes after every write, so each chunk the upstream
// sends reaches the client at once. Unwrap lets http.ResponseController
// (which ReverseProxy uses for event streams) reach the real writer.
type recorder struct {
	http.ResponseWriter
	status   int
	writeErr error
}

func (w *recorder) WriteHeader(code int) {
	if code == http.StatusContinue {
		// net/http already sent the client its one 100 Continue when the
		// body was read; one the upstream sends is not passed on.
		return
	}
	if code >= 100 && code < 200 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	if err == nil {
		err = w.flush()
	}
	if err != nil && w.writeErr == nil {
		w.writeErr = err
	}
	return n, err
}

// flush sends what has been written to the client.
func (w *recorder) flush() error {
	switch f := w.ResponseWriter.(type) {
	case interface{ FlushError() error }:
		return f.FlushError()
	case http.Flusher:
		f.Flush()
	}
	return nil
}

func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// newRequestID returns "req_" and 128 random bits in lowercase hex.
func newRequestID() string {
	var raw [16]byte
	rand.Read(raw[:]) // never fails (crypto/rand)
	var id [4 + 32]byte
	copy(id[:], "req_")
	hex.Encode(id[4:], raw[:])
	return string(id[:])
}

// copyBufferSize is the size of the pooled buffers that response bodies
// stream through. Every open stream holds one for its whole life.
const copyBufferSize = 32 << 10

// bufferPool is ReverseProxy's BufferPool. It stores array pointers, so
// Put does not allocate.
type bufferPool struct{ p sync.Pool }

func (bp *bufferPool) Get() []byte {
	if b, ok := bp.p.Get().(*[copyBufferSize]byte); ok {
		return b[:]
	}
	return make([]byte, copyBufferSize)
}

func (bp *bufferPool) Put(b []byte) {
	if len(b) == copyBufferSize {
		bp.p.Put((*[copyBufferSize]byte)(b))
	}
}

// bodyBudget bounds the memory held by buffered request bodies across all
// requests (SPEC: Memory, 64 MiB). A request that does not fit waits, first
// come first served; a waiter holds nothing, so waiting cannot deadlock.
type bodyBudget struct {
	mu      sync.Mutex
	free    int64
	waiters []*budgetWaiter
}

type budgetWaiter struct {
	n     int64
	ready chan struct{} // closed once n bytes are reserved for the waiter
}

func newBodyBudget(size int64) *bodyBudget { return &bodyBudget{free: size} }

// acquire reserves n bytes, waiting until they are free or ctx is done.
func (b *bodyBudget) acquire(ctx context.Context, n int64) error {
	b.mu.Lock()
	if len(b.waiters) == 0 && b.free >= n {
		b.free -= n
		b.mu.Unlock()
		return nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.waiters = append(b.waiters, w)
	b.mu.Unlock()

	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	select {
	case <-w.ready: // granted meanwhile: give it back
		b.free += n
	default:
		for i, o := range b.waiters {
			if o == w {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				break
			}
		}
	}
	b.grantLocked()
	b.mu.Unlock()
	return ctx.Err()
}

// release returns n reserved bytes and wakes the waiters that now fit.
func (b *bodyBudget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.free += n
	b.grantLocked()
	b.mu.Unlock()
}

func (b *bodyBudget) grantLocked() {
	for len(b.waiters) > 0 && b.waiters[0].n <= b.free {
		w := b.waiters[0]
		b.waiters = b.waiters[1:]
		b.free -= w.n
		close(w.ready)
	}
}
