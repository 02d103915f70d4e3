package main

import (
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"
)

// tuning holds the fixed numbers of SPEC.md that are not in the config
// file. Tests shorten them; production uses defaultTuning.
type tuning struct {
	connectTimeout time.Duration // TCP connect to the upstream
	tlsTimeout     time.Duration // TLS handshake with the upstream
	attempts       int           // upstream attempts for a phase-2 timeout
	retryPause     time.Duration // pause between those attempts
	drainTimeout   time.Duration // how long shutdown waits for in-flight requests
	headerTimeout  time.Duration // to read a client's request headers (slowloris)
	bodyBudget     int64         // bytes of request bodies buffered at once
	overloadAt     int64         // memory pressure at which new work is refused; 0: 3/4 of GOMEMLIMIT
	resolver       *net.Resolver // looks up the upstream; nil: the system's
}

// defaultTuning is SPEC.md's: 5 s connect plus 5 s TLS handshake, 3
// attempts 100 ms apart, a 5 s drain (the pod's 10 s grace period less the
// 3 s preStop sleep, with margin), 10 s to send request headers, and a
// 64 MiB body budget (half the pod's 128 MiB memory limit).
var defaultTuning = tuning{
	connectTimeout: 5 * time.Second,
	tlsTimeout:     5 * time.Second,
	attempts:       3,
	retryPause:     100 * time.Millisecond,
	drainTimeout:   5 * time.Second,
	headerTimeout:  10 * time.Second,
	bodyBudget:     64 << 20,
}

// server holds everything a request needs. It is the process's only state.
type server struct {
	cfg       *Config
	log       *slog.Logger
	metrics   *metrics
	health    http.Handler
	transport *http.Transport // upstream connections; tests may adjust TLSClientConfig
	proxy     *httputil.ReverseProxy
	rules     []headerRule
	slots     chan struct{} // one token per proxied request in flight
	budget    *bodyBudget
	guard     *memoryGuard
	tun       tuning
	inflight  sync.WaitGroup // proxied requests whose handler has not returned
	cutting   atomic.Bool    // set once shutdown closes the requests still open
}

func newServer(cfg *Config, log *slog.Logger, tun tuning) *server {
	s := &server{
		cfg:     cfg,
		log:     log,
		metrics: newMetrics(),
		rules:   newHeaderRules(cfg.Headers),
		slots:   make(chan struct{}, cfg.MaxConnections),
		tun:     tun,
	}
	s.budget = newBodyBudget(tun.bodyBudget, budgetReserve(tun.bodyBudget, cfg.MaxBodyBytes), &s.metrics.bodyBudget, &s.metrics.waiting[waitBodyBudget])
	s.guard = newMemoryGuard(tun.overloadAt)
	s.health = healthHandler(s.metrics, time.Now())
	s.transport = newTransport(cfg, tun)
	s.proxy = &httputil.ReverseProxy{
		Rewrite:   s.rewrite,
		Transport: &retryTransport{next: s.transport, pause: tun.retryPause},
		// clientWriter flushes after every write, and ReverseProxy itself
		// flushes event streams and bodies of unknown length at once. An
		// interval of -1 would add a separate write of the headers alone
		// (and a goroutine) to every response.
		FlushInterval:  0,
		BufferPool:     &bufferPool{},
		ModifyResponse: s.modifyResponse,
		ErrorHandler:   s.proxyError,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return s
}

// newTransport returns the upstream transport: HTTP/2 to HTTPS upstreams
// when offered (with pings to detect dead connections), idle connections
// kept for reuse, no compression of its own, and the connect phase of
// SPEC.md's timeouts. There is no overall deadline: streams may last hours.
func newTransport(cfg *Config, tun tuning) *http.Transport {
	dialer := &net.Dialer{
		Timeout:   tun.connectTimeout,
		Resolver:  tun.resolver,
		KeepAlive: 30 * time.Second, // TCP keepalives find dead HTTP/1.1 peers
	}
	return &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         dialer.DialContext,
		TLSHandshakeTimeout: tun.tlsTimeout,
		// No ResponseHeaderTimeout: the wait for headers depends on the
		// request (phase2), so retryTransport times each attempt itself.
		ForceAttemptHTTP2:      true,
		DisableCompression:     true, // no Accept-Encoding added; bytes pass as sent
		MaxIdleConnsPerHost:    cfg.MaxConnections,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 1 << 20, // 1 MiB of response headers is plenty
		HTTP2: &http.HTTP2Config{
			SendPingTimeout: 15 * time.Second, // ping a connection silent this long
			PingTimeout:     15 * time.Second, // and drop it if the ping goes unanswered
			// What an upstream may send on one stream before the proxy
			// reads it: a client that stops reading leaves this much in the
			// proxy's memory. 32 KiB instead of Go's 4 MiB, so that 1,000
			// such streams fit in the pod (bench/abuse, "nonreaders"); a
			// stream still moves 3 MB/s at a 10 ms round trip, far more
			// than a model generates.
			MaxReceiveBufferPerStream: 32 << 10,
		},
	}
}

// cutStreams closes every connection still open after the drain, and waits
// up to wait for the cut requests to write their log lines, so that none is
// lost to the process exiting.
func (s *server) cutStreams(srv *http.Server, wait time.Duration) {
	s.cutting.Store(true)
	srv.Close()
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// ServeHTTP routes: GET and HEAD of exactly /health and /metrics are
// answered here, outside the concurrency limit; everything else, any other
// method or spelling included, is proxied as sent. No ServeMux: it would
// clean paths and redirect.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if (r.Method == http.MethodGet || r.Method == http.MethodHead) && r.URL.RawPath == "" {
		switch r.URL.Path {
		case "/health":
			s.health.ServeHTTP(w, r)
			return
		case "/metrics":
			s.metrics.ServeHTTP(w, r)
			return
		}
	}
	s.serveProxy(w, r)
}

// httpServer returns the listener-side settings of SPEC.md.
func (s *server) httpServer() *http.Server {
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: s.tun.headerTimeout, // slowloris
		IdleTimeout:       120 * time.Second,   // idle keep-alive client connections
		// net/http refuses headers over this (plus 4 KiB of slack) with
		// its own plain 431 before the handler runs; admit refuses over
		// 32 KiB or 100 fields with the JSON one.
		MaxHeaderBytes: maxHeaderBytes,
		ConnContext:    connContext,
		// No ReadTimeout or WriteTimeout: they would cut long streams.
		ErrorLog:                     slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		DisableGeneralOptionsHandler: true, // "OPTIONS *" is proxied too
	}
}
