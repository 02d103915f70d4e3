package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"oauth-proxy/bench/internal/selfsigned"
)

// upstream is the stand-in for api.anthropic.com, served from inside the
// harness so that it can count what reaches it (ghosts above all) and hold
// requests until a scenario releases them. Like the real API it speaks
// HTTP/2 over TLS, with a fresh self-signed certificate for 127.0.0.1 that
// the proxy trusts through SSL_CERT_FILE.
//
// Endpoints (every /v1/ request must carry the anthropic-beta flag the
// proxy injects, else 400 and noBeta counts it):
//
//	GET  /v1/sse?every=D&for=D   an SSE event every D (carrying its send
//	                             time) for D, then the stream ends
//	GET  /v1/big?bytes=N         N bytes in 64 KiB writes, as fast as the
//	                             proxy takes them
//	ANY  /v1/hold                drains the body, then waits for release
//	                             (or for the proxy to cancel) and answers
//	ANY  /v1/ghost               counted in ghosts, then answered: a ghost
//	                             trial's request must never arrive here
//	POST /v1/messages            drains the body, answers a small Message
type upstream struct {
	addr     string // host:port of the TLS listener
	certFile string // PEM certificate, for the proxy's SSL_CERT_FILE
	srv      *http.Server

	mu   sync.Mutex
	gate chan struct{} // /v1/hold waits for it to be closed

	ghosts atomic.Int64 // /v1/ghost requests that arrived
	held   atomic.Int64 // /v1/hold requests waiting now
	noBeta atomic.Int64 // /v1/ requests without the injected flag
}

// beta is the anthropic-beta token the proxy's default config injects.
const beta = "oauth-2025-04-20"

// reply is the small Messages API answer of the non-streaming endpoints.
var reply = []byte(`{"id":"msg_01abuse","type":"message","role":"assistant","model":"claude-sonnet-4-5",` +
	`"content":[{"type":"text","text":"ok"}],"stop_reason":"end_turn","stop_sequence":null,` +
	`"usage":{"input_tokens":12,"output_tokens":1}}` + "\n")

// bigChunk is what /v1/big writes, 64 KiB at a time.
var bigChunk = []byte(strings.Repeat("0123456789abcdef", 64<<10/16))

// startUpstream listens on a free port of 127.0.0.1 and serves until
// close. The certificate goes to dir/upstream.pem.
func startUpstream(dir string) (*upstream, error) {
	u := &upstream{certFile: dir + "/upstream.pem", gate: make(chan struct{})}
	cert, err := selfsigned.Certificate("oauth-proxy abuse upstream", u.certFile)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u.addr = ln.Addr().String()
	u.srv = &http.Server{
		Handler:   u,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
		ErrorLog:  log.New(io.Discard, "", 0), // resets by the proxy are expected
	}
	go u.srv.ServeTLS(ln, "", "") // HTTP/2 is offered by default
	return u, nil
}

func (u *upstream) close() { u.srv.Close() }

// reset prepares the upstream for a scenario: counters at zero, the gate
// closed again. Requests still held from the last one are let go.
func (u *upstream) reset() {
	u.release()
	u.rearm()
	u.ghosts.Store(0)
	u.noBeta.Store(0)
}

// rearm closes the gate again after a release: requests arriving from
// now on are held.
func (u *upstream) rearm() {
	u.mu.Lock()
	defer u.mu.Unlock()
	select {
	case <-u.gate:
		u.gate = make(chan struct{})
	default:
	}
}

// release answers every held request, and any that arrives later, until
// the next reset.
func (u *upstream) release() {
	u.mu.Lock()
	defer u.mu.Unlock()
	select {
	case <-u.gate:
	default:
		close(u.gate)
	}
}

func (u *upstream) holdGate() <-chan struct{} {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.gate
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/ghost" {
		// Counted before anything else: arriving at all is the failure.
		u.ghosts.Add(1)
	}
	if !strings.Contains(strings.Join(r.Header.Values("Anthropic-Beta"), ","), beta) {
		u.noBeta.Add(1)
		http.Error(w, "missing anthropic-beta: "+beta, http.StatusBadRequest)
		return
	}
	switch r.URL.Path {
	case "/v1/sse":
		u.sse(w, r)
	case "/v1/big":
		u.big(w, r)
	case "/v1/hold":
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return
		}
		u.held.Add(1)
		select {
		case <-u.holdGate():
		case <-r.Context().Done():
		}
		u.held.Add(-1)
		writeReply(w)
	default: // /v1/messages, /v1/ghost
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return
		}
		writeReply(w)
	}
}

func writeReply(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(reply)))
	h.Set("Request-Id", "req_abuse")
	w.Write(reply)
}

// sse streams an event every "every" until "for" has passed or the proxy
// cancels. Each event carries its send time in Unix nanoseconds, so the
// client can tell how late it arrived.
func (u *upstream) sse(w http.ResponseWriter, r *http.Request) {
	every, err := time.ParseDuration(r.URL.Query().Get("every"))
	if err != nil || every <= 0 {
		every = 100 * time.Millisecond
	}
	length, _ := time.ParseDuration(r.URL.Query().Get("for"))
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	end := time.NewTimer(length)
	defer end.Stop()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-end.C:
			return
		case <-tick.C:
			line := fmt.Appendf(nil, "event: content_block_delta\ndata: {\"sent\":%d}\n\n", time.Now().UnixNano())
			if _, err := w.Write(line); err != nil || rc.Flush() != nil {
				return
			}
		}
	}
}

// big writes bytes=N bytes, as fast as flow control lets it.
func (u *upstream) big(w http.ResponseWriter, r *http.Request) {
	n, _ := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	for n > 0 {
		p := bigChunk[:min(int64(len(bigChunk)), n)]
		if _, err := w.Write(p); err != nil {
			return
		}
		n -= int64(len(p))
	}
}
