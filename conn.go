package main

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Client connections (SPEC: Limits under abuse). The listener bounds how
// many are open; each connection's writes must make progress.

// overflowConns is how many connections beyond the bound are still served,
// briefly, so that probes and scrapes keep answering while the proxy
// refuses load; connections beyond those are closed as soon as accepted.
const overflowConns = 64

// overflowDeadline is how long an overflow connection lives: enough for a
// probe or a scrape, or for a refusal to reach its client.
const overflowDeadline = 10 * time.Second

// connBound is the number of open client connections served in full:
// max_connections for the requests in flight, as many again for requests
// waiting for a slot and idle keep-alive connections (SDK pools), and 64
// more for the connections clients have closed and net/http has yet to
// see closed.
func connBound(cfg *Config) int64 { return 2*int64(cfg.MaxConnections) + 64 }

// listener counts the client connections, marks those past the bound, and
// runs the memory guard while it is open.
type listener struct {
	net.Listener
	s     *server
	bound int64
	stop  chan struct{} // closed with the listener: stops the guard
	once  sync.Once

	mu    sync.Mutex
	conns map[*clientConn]struct{} // open connections within the bound
}

// listen wraps ln, the server's listener, and starts the memory guard.
func (s *server) listen(ln net.Listener) net.Listener {
	l := &listener{Listener: ln, s: s, bound: connBound(s.cfg), stop: make(chan struct{}), conns: make(map[*clientConn]struct{})}
	go s.guard.run(l.stop, l.shed)
	return l
}

func (l *listener) Close() error {
	l.once.Do(func() { close(l.stop) })
	return l.Listener.Close()
}

// shedAfter is how long a response write must have been blocked for the
// memory guard to cut it: the client is not reading, and its response's
// buffers are what grows after a request was admitted.
const shedAfter = 250 * time.Millisecond

// shed cuts the responses whose writes have been blocked for shedAfter:
// their blocked Write fails at once, as if timeout_secs had passed.
func (l *listener) shed() {
	now := time.Now().UnixNano()
	cut := 0
	l.mu.Lock()
	for c := range l.conns {
		if since := c.writing.Load(); since != 0 && now-since >= int64(shedAfter) {
			c.cut.Store(true)
			c.Conn.SetWriteDeadline(time.Unix(1, 0))
			cut++
		}
	}
	l.mu.Unlock()
	l.s.log.Warn("memory near its limit: refusing new requests", "pressure_bytes", l.s.guard.last.Load(),
		"limit_bytes", l.s.guard.limit.Load(), "responses_cut", cut)
}

// Accept returns the next connection: within the bound, or one of the
// overflowConns past it, marked. Connections beyond those are closed at
// once and counted as refused.
func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cc := &clientConn{Conn: c, l: l, timeout: l.s.cfg.Timeout}
		switch n := l.s.metrics.clientConns.Add(1); {
		case n > l.bound+overflowConns:
			l.s.metrics.refuse(refuseTooManyConns)
			cc.Close()
			continue
		case n > l.bound:
			cc.overflow = true
			c.SetDeadline(time.Now().Add(overflowDeadline))
		default:
			l.mu.Lock()
			l.conns[cc] = struct{}{}
			l.mu.Unlock()
		}
		return cc, nil
	}
}

// clientConn is a client connection. A Write must make progress within
// timeout_secs, or it fails: a client that stops reading cannot hold its
// request's slot and memory until TCP gives up (there is no WriteTimeout,
// which would cut long streams). Progress is any byte the kernel takes, as
// with nginx's send_timeout: the kernel takes more once the client has
// read enough to free a part of the socket buffer.
type clientConn struct {
	net.Conn
	l        *listener
	timeout  time.Duration
	overflow bool         // past the bound: local endpoints only, then closed
	writing  atomic.Int64 // unix nanoseconds since a Write has waited; 0: none
	cut      atomic.Bool  // the memory guard cut the blocked Write
	closed   atomic.Bool
}

func (c *clientConn) Write(p []byte) (int, error) {
	if c.overflow { // an overflow connection keeps its fixed deadline
		return c.Conn.Write(p)
	}
	written := 0
	for {
		now := time.Now()
		c.writing.Store(now.UnixNano())
		c.Conn.SetWriteDeadline(now.Add(c.timeout))
		n, err := c.Conn.Write(p[written:])
		c.writing.Store(0)
		written += n
		if err == nil || n == 0 || !errors.Is(err, os.ErrDeadlineExceeded) || c.cut.Load() {
			return written, err
		}
	}
}

func (c *clientConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.s.metrics.clientConns.Add(-1)
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	}
	return c.Conn.Close()
}

// CloseWrite lets net/http half-close the connection after an error
// response, as it does on a bare *net.TCPConn.
func (c *clientConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

type connKey struct{}

// connContext is the http.Server's ConnContext: it makes each request's
// connection findable with connFrom.
func connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// connFrom returns the client connection of a request's context, or nil.
func connFrom(ctx context.Context) *clientConn {
	c, _ := ctx.Value(connKey{}).(*clientConn)
	return c
}

// overflowed reports whether c is past the connection bound.
func (c *clientConn) overflowed() bool { return c != nil && c.overflow }

// gone reports whether the client has closed its side of the connection
// or reset it, as far as the kernel knows now. net/http watches the
// connection only once a request's body has been read, so a client that
// left while its request waited is seen here, before it is forwarded.
func (c *clientConn) gone() bool {
	return c != nil && peerClosed(c.Conn)
}
