package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
	"syscall"
	"time"
)

// This file follows one proxied request from top to bottom:
//
//   - server.go's ServeHTTP routes everything but /health and /metrics to
//     serveProxy, which gives the request an ID and an exchange, and defers
//     finish.
//   - Admission: admit refuses what the proxy will not take (a target with
//     no path, headers over their limits, a connection past the bound,
//     memory near its limit); takeSlot waits for one of max_connections
//     slots; body.go's readBody buffers the body against the shared budget
//     so that a retry can replay it; messages.go's phase2 decides how long
//     the response headers may take and how many attempts there are.
//   - The outgoing request: stripHopByHop, then ReverseProxy's rewrite hook
//     (upstream URL, the path and query byte for byte, the header rules).
//   - The retry transport: each attempt with its own context and phase-2
//     timer; an attempt that got no response headers in time is retried.
//   - The response: modifyResponse refuses a 101, drops the buffered body
//     and times the upstream's body; clientWriter flushes every write.
//   - Errors: proxyError and writeError, the one place that turns a failure
//     into the JSON error of SPEC.md.
//   - The final record: finish decides the status the request ends with
//     (outcome), then counts it and writes its one log line.
//
// The bodies a request moves through each have a wrapper named for its leg:
// uploadBody (client to proxy, body.go), sendBody (proxy to upstream),
// responseBody (upstream to proxy) and clientWriter (proxy to client).
//
// Every timing rule, and where it lives:
//
//	client's headers      10 s                      server.go httpServer
//	client's upload       a byte per timeout_secs,
//	                      1 KiB/s on average → 408  body.go uploadBody
//	room for the body     timeout_secs → 503        body.go bodyBudget
//	connect, TLS          5 s each → 502            server.go newTransport
//	response headers      timeout_secs from the     headerWait, and
//	                      request's last byte → 504 messages.go phase2
//	                      (non-streaming message:
//	                      the client's own timeout)
//	upstream taking the   a byte per timeout_secs
//	request body          → 504                     sendBody
//	response body         a byte per timeout_secs   responseBody
//	client taking the     a write's progress per
//	response              timeout_secs → 499        conn.go clientConn
//	memory near its limit writes blocked 250 ms     conn.go listener.shed
//	shutdown              5 s drain, then cut       main.go, server.go

// exchange is one proxied request's state, in one allocation. It is the
// outgoing request's context itself (wrapping the client's), so the
// ReverseProxy hooks find it with exchangeFrom. Every field has its value
// from the start: before the first attempt, attempt is the client's context
// and cancel does nothing. Everything in it is touched only by the request's
// handler goroutine, except cancel, which timer goroutines call, and
// timeout, which the transport's goroutine reads (sendBody).
type exchange struct {
	context.Context        // the client's request context; done when the client leaves
	id              string // "req_" + 32 hex digits
	timeout         time.Duration

	// Admission and the body (body.go, messages.go).
	upload         uploadBody    // reads the client's body against its deadlines
	body           requestBody   // the buffered request body; empty once headers arrived
	scan           streamScanner // looks for "stream" in a Messages body
	maxAttempts    int           // attempts a phase-2 timeout allows
	clientDeadline time.Time     // phase 2 lasts at least until then; zero for timeout_secs alone
	clientWait     time.Duration // the client's own timeout behind clientDeadline

	// The upstream attempts (retryTransport).
	attempt  context.Context         // the current attempt's context
	cancel   context.CancelCauseFunc // cancels attempt, with a cause
	attempts int                     // attempts made
	sending  *sendBody               // the current attempt's watched body, if any

	// The response (modifyResponse, clientWriter).
	response   responseBody // wraps the upstream's response body
	writer     clientWriter // wraps the client's ResponseWriter
	upstreamID string       // upstream "request-id" response header
	messages   bool         // a Messages request: its response's tokens are read (plan.go)
	model      string       // the model the response names, if read
	tokens     [numTokenTypes]int64
	known      [numTokenTypes]bool // which of tokens the response gave

	// The final record (finish).
	err      error // what failed, for the log line
	answered bool  // the proxy wrote its own error response
}

func newExchange(w http.ResponseWriter, r *http.Request, timeout time.Duration) *exchange {
	x := &exchange{Context: r.Context(), id: newRequestID(), timeout: timeout}
	x.attempt, x.cancel = x.Context, noCancel
	x.writer.ResponseWriter = w
	return x
}

func noCancel(error) {}

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

// errClientGone marks requests whose client left before they were proxied.
var errClientGone = errors.New("client went away")

// serveProxy handles every request that is not a local endpoint.
func (s *server) serveProxy(w http.ResponseWriter, r *http.Request) {
	s.inflight.Add(1)
	defer s.inflight.Done()
	x := newExchange(w, r, s.cfg.Timeout)
	start := time.Now()
	defer s.finish(x, r, start)

	// Refuse what the proxy will not take before the request waits for
	// anything.
	if !s.admit(x, r) {
		return
	}

	// Take a slot before reading the body (SPEC: Concurrency). A client that
	// gives up while waiting is dropped without a response.
	waited, err := s.takeSlot(r.Context())
	switch err {
	case errClientGone:
		x.err = err
		return
	case errOverloaded:
		s.refuseOverloaded(x)
		return
	}
	defer s.releaseSlot()

	// Read the body into memory, so that a retry can replay it.
	var scan *streamScanner
	if x.messages = isMessagesCall(r); x.messages {
		scan = &x.scan
	}
	err = s.readBody(x, w, r, scan)
	defer s.dropBody(&x.body)
	if err != nil {
		s.bodyFailed(x, r, err)
		return
	}

	// A request whose client has left is never sent upstream. net/http
	// watches the connection only once the body has been read, so a
	// client that left while its request waited is seen by peeking at it.
	waited = waited || x.upload.waited > 0
	if r.Context().Err() != nil || (waited || x.body.size > 0) && connFrom(r.Context()).gone() {
		x.err = errClientGone
		return
	}

	s.phase2(x, r, start, scan)
	stripHopByHop(r.Header)

	defer func() { x.cancel(nil) }() // the last attempt's; the others are cancelled already
	out := r.WithContext(x)
	out.ContentLength = x.body.size
	out.TransferEncoding = nil
	out.Trailer = nil // request trailers would escape the header rules
	out.Body, out.GetBody = http.NoBody, nil
	if x.body.size > 0 {
		// Every attempt takes its reader from GetBody (retryTransport).
		out.GetBody = x.getBody
	}
	s.proxy.ServeHTTP(&x.writer, out)
}

// newRequestID returns "req_" and 128 random bits in lowercase hex.
func newRequestID() string {
	var raw [16]byte
	rand.Read(raw[:]) // never fails (crypto/rand)
	var id [4 + 32]byte
	copy(id[:], "req_")
	hex.Encode(id[4:], raw[:])
	return string(id[:])
}

// Admission: what the proxy refuses before it waits for anything, the
// concurrency slot, and the answers to a body that could not be read
// (reading it is body.go's readBody).

// errOpaqueTarget marks requests whose target has no path to forward.
var errOpaqueTarget = errors.New("request target is not a path")

// Limits on a request's headers (SPEC: Server protections): real clients
// send under 4 KiB in about 20 fields. nginx's default total is 32 KiB,
// HAProxy's field limit 101.
const (
	maxHeaderBytes  = 32 << 10
	maxHeaderFields = 100
)

// admit refuses, with its error response, a request the proxy will not
// take: a target with no path, headers over their limits, a connection
// past the bound, or any request while memory is near its limit.
func (s *server) admit(x *exchange, r *http.Request) bool {
	if r.URL.Opaque != "" {
		// A target with no path ("http:foo": a URL without "//") cannot
		// be joined to upstream_url; sent on, it would be an invalid
		// request line.
		s.failRequest(&x.writer, x, http.StatusBadRequest, errTypeInvalidRequest, "request target must be a path", errOpaqueTarget)
		return false
	}
	fields, size := headerSize(r)
	switch {
	case fields > maxHeaderFields:
		s.refuse(x, http.StatusRequestHeaderFieldsTooLarge, refuseTooManyHeaders, errTypeInvalidRequest,
			"request has "+strconv.Itoa(fields)+" header fields, more than "+strconv.Itoa(maxHeaderFields))
	case size > maxHeaderBytes:
		s.refuse(x, http.StatusRequestHeaderFieldsTooLarge, refuseHeadersTooLarge, errTypeInvalidRequest,
			"request headers take "+strconv.Itoa(size)+" bytes, more than "+strconv.Itoa(maxHeaderBytes))
	case connFrom(r.Context()).overflowed():
		x.writer.Header().Set("Connection", "close")
		s.refuse(x, http.StatusServiceUnavailable, refuseTooManyConns, errTypeOverloaded,
			"proxy overloaded: too many client connections, retry later")
	case s.guard.overloaded():
		s.refuseOverloaded(x)
	default:
		return true
	}
	return false
}

// headerSize returns the number of header fields of r and the bytes its
// request line and headers took, as sent.
func headerSize(r *http.Request) (fields, size int) {
	size = len(r.Method) + 1 + len(r.RequestURI) + 1 + len(r.Proto) + 2
	if r.Host != "" {
		fields, size = 1, size+len("Host: \r\n")+len(r.Host)
	}
	for k, vv := range r.Header {
		for _, v := range vv {
			fields++
			size += len(k) + 2 + len(v) + 2
		}
	}
	return fields, size
}

// takeSlot waits for one of max_connections slots, and reports whether it
// waited. It gives up with errClientGone when ctx is done, and with
// errOverloaded when the memory guard acts: a waiting request holds its
// headers in memory.
func (s *server) takeSlot(ctx context.Context) (waited bool, err error) {
	select {
	case s.slots <- struct{}{}:
	default:
		s.metrics.waiting[waitSlot].Add(1)
		defer s.metrics.waiting[waitSlot].Add(-1)
		select {
		case s.slots <- struct{}{}:
		case <-ctx.Done():
			return true, errClientGone
		case <-s.guard.waiting():
			return true, errOverloaded
		}
		waited = true
	}
	s.metrics.inFlight.Add(1)
	return waited, nil
}

func (s *server) releaseSlot() {
	s.metrics.inFlight.Add(-1)
	<-s.slots
}

// bodyFailed answers a request whose body could not be read.
func (s *server) bodyFailed(x *exchange, r *http.Request, err error) {
	switch {
	case err == errBodyTooLarge:
		s.refuse(x, http.StatusRequestEntityTooLarge, refuseBodyTooLarge, errTypeInvalidRequest,
			"request body exceeds "+strconv.FormatInt(s.cfg.MaxBodyBytes, 10)+" bytes")
	case err == errBodyStalled, err == errBodyTooSlow:
		s.refuse(x, http.StatusRequestTimeout, refuseBodyTooSlow, errTypeInvalidRequest, x.upload.message(err))
	case err == errNoBodyRoom:
		s.refuse(x, http.StatusServiceUnavailable, refuseBodyBudget, errTypeOverloaded,
			"proxy overloaded: no room to buffer the request body within "+formatSeconds(s.cfg.Timeout)+", retry later")
	case err == errOverloaded:
		s.refuseOverloaded(x)
	case isClientGone(r.Context(), err):
		x.err = err
	default:
		s.failRequest(&x.writer, x, http.StatusBadRequest, errTypeInvalidRequest, "cannot read request body: "+err.Error(), err)
	}
}

// refuse answers a request the proxy refuses by one of its own limits.
func (s *server) refuse(x *exchange, status int, why refusal, kind errorType, msg string) {
	s.metrics.refuse(why)
	s.failRequest(&x.writer, x, status, kind, msg, errors.New(msg))
}

// refuseOverloaded answers a request the memory guard refuses.
func (s *server) refuseOverloaded(x *exchange) {
	s.refuse(x, http.StatusServiceUnavailable, refuseOverloaded, errTypeOverloaded,
		"proxy overloaded: memory near its limit, retry later")
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

// The outgoing request: hop-by-hop headers out, the upstream's URL in,
// the header rules applied.

// hopHeaders are the hop-by-hop headers of RFC 9110 section 7.6.1, plus the
// non-standard Proxy-Connection. They describe one connection and are never
// forwarded, and so can never be configured (config.go refuses them from
// this same table).
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
	// The path as sent, byte for byte: url.URL would re-encode what it
	// finds invalid ("|{}^\"", the "*" of "OPTIONS *"). As Opaque, it is
	// the request line's target (HTTP/1) or :path (HTTP/2) verbatim. A
	// path starting "//" cannot be Opaque (it would turn into an absolute
	// URL naming another host), and keeps SetURL's escaped form.
	if path := strings.TrimSuffix(s.cfg.Upstream.EscapedPath(), "/") + rawPath(pr.In); !strings.HasPrefix(path, "//") {
		pr.Out.URL.Opaque = path
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

// rawPath returns the path of r's request target as the client sent it:
// "/*" for the asterisk form of "OPTIONS *", and the path of an absolute
// form ("http://host/path"), whose host is ignored.
func rawPath(r *http.Request) string {
	target, _, _ := strings.Cut(r.RequestURI, "?")
	switch {
	case strings.HasPrefix(target, "/"):
		return target
	case target == "*":
		return "/*"
	}
	_, rest, ok := strings.Cut(target, "://")
	if i := strings.IndexByte(rest, '/'); ok && i >= 0 {
		return rest[i:]
	}
	return "/"
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

// The retry transport: each attempt's phase-2 timer, the retries, and
// the request body each attempt sends.

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
	hw := &headerWait{timeout: x.timeout, deadline: x.clientDeadline, cancel: cancel}
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
	hw.stop() // from here on, the timer cannot fire
	if context.Cause(ctx) == errHeaderTimeout {
		// The timer fired first. A response that still got through
		// belongs to a cancelled attempt (an upstream that answered
		// because its connection was closed): its body is cut already.
		if err == nil {
			res.Body.Close()
		}
		return nil, errHeaderTimeout
	}
	if err != nil {
		cancel(nil)
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

// getBody is the outgoing request's GetBody: a fresh reader of the buffered
// body for each attempt. A body in one chunk is read through a
// *bytes.Reader, which net/http knows to be in memory. A larger body may
// not fit in the socket and HTTP/2 flow-control buffers, so an upstream
// that stops reading it could hold the request before any of the timeouts
// starts; its reader watches for that.
func (x *exchange) getBody() (io.ReadCloser, error) {
	var r io.Reader = x.body.reader()
	if len(x.body.chunks) == 1 {
		r = bytes.NewReader(x.body.chunks[0])
	}
	if x.body.size < sendWatchMin {
		return io.NopCloser(r), nil
	}
	sb := &sendBody{r: r, x: x, cancel: x.cancel}
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
	r      io.Reader
	x      *exchange
	cancel context.CancelCauseFunc // the attempt's
	timer  *time.Timer
	done   atomic.Bool
}

func (sb *sendBody) Read(p []byte) (int, error) {
	n, err := sb.r.Read(p)
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

// The response: the upstream's headers checked, its body timed as it
// streams, and every write flushed to the client.

// errSwitchingProtocols refuses an upstream's 101 response: the proxy
// forwards no Upgrade header, so a protocol switch is never one the client
// asked for.
var errSwitchingProtocols = errors.New("protocol switch (101) refused: upgrades are not proxied")

// modifyResponse is ReverseProxy's ModifyResponse hook. It refuses a 101,
// notes the upstream's request-id and rate limits, and puts the idle timer
// (and, for a Messages response, the token reading) on the response body.
func (s *server) modifyResponse(res *http.Response) error {
	if res.StatusCode == http.StatusSwitchingProtocols {
		// Returning an error makes ReverseProxy close the upstream
		// connection; its own upgrade path leaves it open when the
		// protocols do not match.
		return errSwitchingProtocols
	}
	x := exchangeFrom(res.Request.Context())
	x.upstreamID = res.Header.Get("Request-Id")
	s.bodyDone(x, res)
	s.metrics.plan.rateLimits(res.Header)
	if res.Body != nil && res.Body != http.NoBody {
		x.response = responseBody{rc: res.Body, x: x, metrics: s.metrics, timeout: s.cfg.Timeout}
		if x.messages {
			x.response.usage = s.metrics.plan.startUsage(res)
			x.response.org = res.Header.Get(organizationKey)
		}
		res.Body = &x.response
	}
	return nil
}

// errIdleTimeout is the cancellation cause when a response body stays silent
// for timeout_secs (SPEC: phase 3, reset by every chunk).
var errIdleTimeout = errors.New("upstream stream idle timeout")

// responseBody cancels the upstream request when no byte arrives for timeout
// (SPEC: phase 3). The timer runs only while Read waits for the upstream,
// and restarts with every Read: a stream that keeps sending may last for
// hours, and a client that is slow to take the bytes (the write blocks)
// never makes the upstream look idle. For a Messages response, Read also
// feeds every byte to the usage reading (plan.go), and Close ends it,
// counts its tokens and returns it to its pool.
type responseBody struct {
	rc      io.ReadCloser
	x       *exchange
	metrics *metrics
	timer   *time.Timer // nil until the first Read
	timeout time.Duration
	usage   *usageReading // reads the tokens of a Messages response; nil for others
	org     string        // the response's anthropic-organization-id
}

func (b *responseBody) expire() { b.x.cancel(errIdleTimeout) }

// Read passes data through. A failure is noted on the exchange for the log
// line and reported to ReverseProxy as context.Canceled, which makes it
// abort the client connection without logging a second, unrelated line.
func (b *responseBody) Read(p []byte) (int, error) {
	if b.timer == nil {
		b.timer = time.AfterFunc(b.timeout, b.expire)
	} else {
		b.timer.Reset(b.timeout)
	}
	n, err := b.rc.Read(p)
	b.timer.Stop()
	if b.usage != nil && n > 0 {
		b.usage.write(p[:n])
	}
	if err != nil && err != io.EOF {
		switch {
		case b.x.Err() != nil:
			b.x.err = errClientGone
		case context.Cause(b.x.attempt) == errIdleTimeout:
			b.x.err = errors.New("upstream stream idle for " + formatSeconds(b.timeout) + ", closed")
			b.metrics.streamError(errTypeTimeout)
		default:
			b.x.err = errors.New("upstream stream failed: " + err.Error())
			b.metrics.streamError(errTypeConnection)
		}
		return n, context.Canceled
	}
	return n, err
}

func (b *responseBody) Close() error {
	if b.timer != nil {
		b.timer.Stop()
	}
	if u := b.usage; u != nil {
		b.usage = nil
		b.x.model, b.x.tokens, b.x.known = u.end(b.metrics.plan, b.org)
	}
	return b.rc.Close()
}

// bodyDone drops the buffered request body once the response headers
// have arrived: no attempt follows, so a long stream need not hold its
// request's memory or its share of the body budget.
func (s *server) bodyDone(x *exchange, res *http.Response) {
	if x.sending != nil {
		x.sending.stop()
	}
	if res.Request != nil && res.Request.Body != nil {
		res.Request.Body = http.NoBody // the attempt's reader; the transport has its own reference
	}
	s.dropBody(&x.body)
}

// clientWriter remembers the status and any write error for the log line and
// the metrics, and flushes after every write, so each chunk the upstream
// sends reaches the client at once. Unwrap lets http.ResponseController
// (which ReverseProxy uses for event streams) reach the real writer.
type clientWriter struct {
	http.ResponseWriter
	status   int
	writeErr error
}

func (w *clientWriter) WriteHeader(code int) {
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

func (w *clientWriter) Write(p []byte) (int, error) {
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
func (w *clientWriter) flush() error {
	switch f := w.ResponseWriter.(type) {
	case interface{ FlushError() error }:
		return f.FlushError()
	case http.Flusher:
		f.Flush()
	}
	return nil
}

func (w *clientWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// copyBufferSize is the size of the pooled buffers that response bodies
// stream through. Every open stream holds one for its whole life, so it is
// 16 KiB rather than io.Copy's 32 KiB: 1,000 streams fit in the pod.
const copyBufferSize = 16 << 10

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

// Errors: the one place a failure becomes the client's JSON error.

// proxyError is ReverseProxy's ErrorHandler: every failure before the
// response headers ends here. It is the one place that classifies errors.
func (s *server) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	x := exchangeFrom(r.Context())
	if x.Err() != nil {
		x.err = errClientGone // nothing is written to a gone client
		return
	}
	if err == errHeaderTimeout {
		attempts := "1 attempt"
		if x.attempts > 1 {
			attempts = strconv.Itoa(x.attempts) + " attempts"
		}
		msg := "upstream response timeout after " + formatSeconds(x.timeout) + " (" + attempts + ")"
		if !x.clientDeadline.IsZero() {
			msg = "upstream response timeout: no response headers within the client's " +
				formatSeconds(x.clientWait) + " timeout (" + attempts + ")"
		}
		s.failRequest(w, x, http.StatusGatewayTimeout, errTypeTimeout, msg, err)
		return
	}
	if context.Cause(x.attempt) == errSendStalled {
		msg := "upstream stopped reading the request body for " + formatSeconds(s.cfg.Timeout)
		s.failRequest(w, x, http.StatusGatewayTimeout, errTypeTimeout, msg, errSendStalled)
		return
	}
	msg := "upstream " + s.cfg.Upstream.Host + ": " + connectionFailure(err, s.tun)
	s.failRequest(w, x, http.StatusBadGateway, errTypeConnection, msg, err)
}

// connectionFailure names the class of a failure to reach the upstream or
// to get its response headers, for the client: the error itself may hold
// addresses inside the cluster (the resolver's, the pod's), so it goes to
// the log line only.
func connectionFailure(err error, tun tuning) string {
	var dnsErr *net.DNSError
	var tlsErr *tls.CertificateVerificationError
	var recErr tls.RecordHeaderError
	var timeout interface{ Timeout() bool }
	text := err.Error()
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return "closed the connection before sending response headers"
	case errors.As(err, &dnsErr):
		if dnsErr.IsNotFound {
			return "DNS lookup failed: no such host"
		}
		return "DNS lookup failed"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH):
		return "host unreachable"
	case errors.As(err, &tlsErr):
		return "TLS certificate not trusted: " + certProblem(tlsErr.Err)
	case errors.As(err, &recErr) || strings.Contains(text, "tls: "):
		return "TLS handshake failed"
	case strings.HasSuffix(text, "TLS handshake timeout"):
		return "TLS handshake timeout after " + formatSeconds(tun.tlsTimeout)
	case errors.As(err, &timeout) && timeout.Timeout():
		return "connect timeout after " + formatSeconds(tun.connectTimeout)
	case errors.Is(err, errSwitchingProtocols):
		return errSwitchingProtocols.Error()
	case strings.Contains(text, "malformed HTTP"):
		return "malformed HTTP response"
	case strings.Contains(text, "server response headers exceeded"):
		return "response headers over 1 MiB"
	}
	return "connection failed"
}

// certProblem names what is wrong with an upstream's certificate.
func certProblem(err error) string {
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		return "signed by an unknown authority"
	case errors.As(err, &host):
		return "not valid for the upstream's name"
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return "expired or not yet valid"
	}
	return "verification failed"
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
	if status == http.StatusServiceUnavailable {
		// Refused load: the SDKs retry after this many seconds.
		h.Set("Retry-After", retryAfter)
	}
	if status == http.StatusGatewayTimeout {
		// The proxy already retried, or must not retry at all; tell the
		// Anthropic SDKs and Claude Code not to multiply the attempts.
		h.Set("X-Should-Retry", "false")
	}
	w.WriteHeader(status)
	w.Write(body)
}

// retryAfter is the Retry-After of a 503: long enough for streams to end
// and memory or room to free up, short enough for an interactive client.
const retryAfter = "5"

// formatSeconds prints d as "60s" for whole seconds.
func formatSeconds(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return d.String()
}

// The final record: the status the request ends with, its metrics and its
// log line.

// errCutAtShutdown marks requests still open when the drain timeout ran out.
var errCutAtShutdown = errors.New("cut at shutdown: still open when the drain timeout ran out")

// errStoppedReading marks a response whose client stopped reading it.
var errStoppedReading = errors.New("client stopped reading: a response write made no progress")

// finish records the request once, whatever happened: its final status
// (outcome), its metrics and its one log line. It runs deferred, so it also
// sees the http.ErrAbortHandler panic with which ReverseProxy leaves a
// stream that failed after its headers were sent; that panic is passed on
// so net/http aborts the client connection.
func (s *server) finish(x *exchange, r *http.Request, start time.Time) {
	p := recover()
	if p != nil && p != http.ErrAbortHandler {
		// A bug, not a fault of the peers: keep the process up, answer 500
		// if nothing was sent yet, and never print a stack trace.
		x.err = errors.New("internal error: " + panicString(p))
		if x.writer.status == 0 {
			s.writeError(&x.writer, x, http.StatusInternalServerError, "internal proxy error")
		} else {
			p = http.ErrAbortHandler
		}
	}
	status, gone := s.outcome(x)
	d := time.Since(start)
	s.metrics.observe(r.Method, status, d)
	s.logRequest(x, r, status, d, gone)
	if p != nil {
		panic(p)
	}
}

// outcome decides the status a request is recorded with, and whether it
// ended because its client left, which is never an error of the proxy's:
//
//   - the client left, or stopped reading the response: 499, whatever was
//     sent (nginx's "client closed request");
//   - the proxy cut it at the end of the drain: the status sent, or 503
//     if none was;
//   - otherwise the status sent; 200 if none was, since ReverseProxy
//     always writes one and the metrics must add up.
//
// It completes x.err from the last write's error.
func (s *server) outcome(x *exchange) (status int, gone bool) {
	w := &x.writer
	stoppedReading := errors.Is(w.writeErr, os.ErrDeadlineExceeded) // clientConn's write deadline
	switch {
	case stoppedReading:
		x.err = fmt.Errorf("%w for %s", errStoppedReading, formatSeconds(s.cfg.Timeout))
		s.metrics.refuse(refuseStoppedReading)
	case x.err == nil && w.writeErr != nil:
		x.err = w.writeErr
	}
	// net/http cancels the client's context on any read error, a stalled
	// body included: a request the proxy answered itself is not "gone".
	gone = stoppedReading || x.err != nil && x.Err() != nil && !x.answered
	status = w.status
	switch {
	case gone && s.cutting.Load():
		// The proxy closed the connection at the end of the drain; the
		// client did not leave.
		gone, x.err = false, errCutAtShutdown
		if status == 0 {
			status = http.StatusServiceUnavailable // nothing was sent
		}
	case gone || x.err == errClientGone:
		gone, status = true, 499
	case status == 0:
		status = http.StatusOK
	}
	return status, gone
}

// logRequest writes the request's one log line: a warning when the proxy
// or the upstream failed it, info otherwise.
func (s *server) logRequest(x *exchange, r *http.Request, status int, d time.Duration, gone bool) {
	level := slog.LevelInfo
	if x.err != nil && !gone {
		level = slog.LevelWarn
	}
	if !s.log.Enabled(context.Background(), level) {
		return
	}
	attrs := make([]slog.Attr, 0, 11)
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
	if x.model != "" {
		attrs = append(attrs, slog.String("model", x.model))
	}
	if x.known[tokenInput] {
		attrs = append(attrs, slog.Int64("input_tokens", x.tokens[tokenInput]))
	}
	if x.known[tokenOutput] {
		attrs = append(attrs, slog.Int64("output_tokens", x.tokens[tokenOutput]))
	}
	if x.err != nil {
		attrs = append(attrs, slog.String("error", x.err.Error()))
	}
	s.log.LogAttrs(context.Background(), level, "request", attrs...)
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
