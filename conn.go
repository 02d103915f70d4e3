package main

import (
	"context"
	"errors"
	"net"
	"os"
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

// listener counts the client connections and marks those past the bound.
type listener struct {
	net.Listener
	s     *server
	bound int64
}

// listen wraps ln, the server's listener.
func (s *server) listen(ln net.Listener) net.Listener {
	return &listener{Listener: ln, s: s, bound: connBound(s.cfg)}
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
		cc := &clientConn{Conn: c, m: l.s.metrics, timeout: l.s.cfg.Timeout}
		switch n := l.s.metrics.clientConns.Add(1); {
		case n > l.bound+overflowConns:
			l.s.metrics.refuse(refuseTooManyConns)
			cc.Close()
			continue
		case n > l.bound:
			cc.overflow = true
			c.SetDeadline(time.Now().Add(overflowDeadline))
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
	m        *metrics
	timeout  time.Duration
	overflow bool // past the bound: local endpoints only, then closed
	closed   atomic.Bool
}

func (c *clientConn) Write(p []byte) (int, error) {
	if c.overflow { // an overflow connection keeps its fixed deadline
		return c.Conn.Write(p)
	}
	written := 0
	for {
		c.Conn.SetWriteDeadline(time.Now().Add(c.timeout))
		n, err := c.Conn.Write(p[written:])
		written += n
		if err == nil || n == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return written, err
		}
	}
}

func (c *clientConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.m.clientConns.Add(-1)
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
