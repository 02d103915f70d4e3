// Command upstream is the bench/ harness's stand-in for the Anthropic API:
// one Go HTTP/1.1 server on 127.0.0.1 behind every proxy under test, and the
// "direct" baseline.
//
// Endpoints:
//
//	GET  /health             200 "ok" (the startup probe for peers without a /health of their own)
//	POST /v1/messages        drains the body, answers ~400 bytes of JSON
//	GET  /v1/sse?n=&gap=&hold=&every=&max=&id=
//	                         n events (default 1), gap apart; with hold=1 the
//	                         stream then stays open, an event every "every"
//	                         (0: silent) until the client leaves or "max"
//	                         (default 2 min) has passed; each event carries
//	                         its send time in Unix nanoseconds
//	GET  /v1/big?bytes=N     N bytes, chunked, in 64 KiB writes
//	GET  /cancelled?id=      waits up to 3 s for stream id's request context
//	                         to be cancelled, answers the time in Unix ns
//	GET  /stats              "active N": SSE streams without an id still open
//
// With -tls-addr it serves the same endpoints over TLS too, HTTP/2 offered
// as api.anthropic.com does, with a fresh self-signed certificate for
// 127.0.0.1 written to -cert-out (a Go client trusts it through
// SSL_CERT_FILE).
//
// Every /v1/ request must carry "anthropic-beta: oauth-2025-04-20" (the
// proxies inject it; the direct client sends it itself), or gets 400: a
// peer configured wrongly shows up as errors, not as a fast number.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"oauth-proxy/bench/internal/selfsigned"
)

const beta = "oauth-2025-04-20"

// reply is the answer to POST /v1/messages: a small Messages API response.
var reply = []byte(`{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant",` +
	`"model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello! How can I help you today?"}],` +
	`"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":10,` +
	`"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}` + "\n")

// chunk is what /v1/big writes, 64 KiB at a time.
var chunk = []byte(strings.Repeat("0123456789abcdef", 64<<10/16))

// upstream holds the cancellation records and the open-stream count.
type upstream struct {
	active atomic.Int64

	mu        sync.Mutex
	cancelled map[string]*cancelRecord
}

// cancelRecord is what is known about one stream id: done is closed once
// at holds the time its request context was cancelled.
type cancelRecord struct {
	done chan struct{}
	at   int64
}

func (u *upstream) record(id string) *cancelRecord {
	u.mu.Lock()
	defer u.mu.Unlock()
	c, ok := u.cancelled[id]
	if !ok {
		c = &cancelRecord{done: make(chan struct{})}
		u.cancelled[id] = c
	}
	return c
}

func main() {
	addr := flag.String("addr", "127.0.0.1:18400", "listen `address`")
	tlsAddr := flag.String("tls-addr", "", "also serve TLS (HTTP/2 offered) on this `address`")
	certOut := flag.String("cert-out", "", "write the TLS certificate (PEM) to this `file`")
	flag.Parse()
	u := &upstream{cancelled: make(map[string]*cancelRecord)}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("POST /v1/messages", u.messages)
	mux.HandleFunc("GET /v1/sse", u.sse)
	mux.HandleFunc("GET /v1/big", u.big)
	mux.HandleFunc("GET /cancelled", u.cancelledAt)
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "active %d\n", u.active.Load())
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("upstream: %v", err)
	}
	srv := &http.Server{Handler: mux, IdleTimeout: 120 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if *tlsAddr != "" {
		cert, err := selfsigned.Certificate("oauth-proxy bench upstream", *certOut)
		if err != nil {
			log.Fatalf("upstream: %v", err)
		}
		tln, err := net.Listen("tcp", *tlsAddr)
		if err != nil {
			log.Fatalf("upstream: %v", err)
		}
		tsrv := &http.Server{Handler: mux, IdleTimeout: 120 * time.Second, ErrorLog: log.New(io.Discard, "", 0),
			TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
		go func() {
			<-ctx.Done()
			tsrv.Close()
		}()
		go tsrv.ServeTLS(tln, "", "") // HTTP/2 is offered by default
	}
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		fmt.Fprintln(os.Stderr, "upstream:", err)
		os.Exit(1)
	}
}

func hasBeta(w http.ResponseWriter, r *http.Request) bool {
	for _, v := range r.Header.Values("Anthropic-Beta") {
		if strings.Contains(v, beta) {
			return true
		}
	}
	http.Error(w, "missing anthropic-beta: "+beta, http.StatusBadRequest)
	return false
}

func (u *upstream) messages(w http.ResponseWriter, r *http.Request) {
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		return
	}
	if !hasBeta(w, r) {
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Request-Id", "req_011CUpstreamBench")
	h.Set("Content-Length", strconv.Itoa(len(reply)))
	w.Write(reply)
}

func (u *upstream) sse(w http.ResponseWriter, r *http.Request) {
	if !hasBeta(w, r) {
		return
	}
	q := r.URL.Query()
	id := q.Get("id")
	if id == "" {
		// Streams with an id are the client-close test's, which may
		// outlive their client on purpose; they are not counted.
		u.active.Add(1)
		defer u.active.Add(-1)
	}
	n, _ := strconv.Atoi(q.Get("n"))
	if n <= 0 {
		n = 1
	}
	gap, _ := time.ParseDuration(q.Get("gap"))
	every, _ := time.ParseDuration(q.Get("every"))
	hold := q.Get("hold") == "1"
	maxHold, err := time.ParseDuration(q.Get("max"))
	if err != nil || maxHold <= 0 {
		maxHold = 2 * time.Minute
	}

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Upstream-Proto", r.Proto) // to check which protocol a proxy used
	rc := http.NewResponseController(w)
	ctx := r.Context()
	seq := 0
	send := func() bool {
		seq++
		line := fmt.Appendf(nil, "event: content_block_delta\ndata: {\"seq\":%d,\"sent\":%d}\n\n", seq, time.Now().UnixNano())
		if _, err := w.Write(line); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	for i := range n {
		if i > 0 && !sleep(ctx, gap) {
			return
		}
		if !send() {
			return
		}
	}
	if !hold {
		return
	}
	// Held open until the client leaves, at most maxHold. The moment the
	// request context is cancelled is what /cancelled reports: how fast the
	// proxy passed the client's departure on.
	limit := time.NewTimer(maxHold)
	defer limit.Stop()
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			at := time.Now().UnixNano()
			if id != "" {
				c := u.record(id)
				c.at = at
				close(c.done)
			}
			return
		case <-limit.C:
			return
		case <-tick:
			if !send() {
				// The write failed before the context said so; the
				// cancellation follows at once.
				<-ctx.Done()
				if id != "" {
					c := u.record(id)
					c.at = time.Now().UnixNano()
					close(c.done)
				}
				return
			}
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (u *upstream) big(w http.ResponseWriter, r *http.Request) {
	if !hasBeta(w, r) {
		return
	}
	n, _ := strconv.ParseInt(r.URL.Query().Get("bytes"), 10, 64)
	w.Header().Set("Content-Type", "application/octet-stream")
	for n > 0 {
		p := chunk
		if int64(len(p)) > n {
			p = p[:n]
		}
		if _, err := w.Write(p); err != nil {
			return
		}
		n -= int64(len(p))
	}
}

func (u *upstream) cancelledAt(w http.ResponseWriter, r *http.Request) {
	c := u.record(r.URL.Query().Get("id"))
	t := time.NewTimer(3 * time.Second)
	defer t.Stop()
	select {
	case <-c.done:
		fmt.Fprintf(w, "%d\n", c.at)
	case <-t.C:
		http.Error(w, "not cancelled within 3s", http.StatusGatewayTimeout)
	}
}
