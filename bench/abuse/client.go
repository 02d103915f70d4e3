package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// The clients: raw HTTP/1.1 on a socket for the abusive ones, which must
// do what net/http never would (stop reading, trickle a body, leave
// mid-request, send 99 header fields), and net/http for the well-behaved
// ones.

// conn is one raw client connection to the proxy.
type conn struct {
	*net.TCPConn
	br *bufio.Reader // made by the first response
}

// dialer connects at most 64 clients at a time: a burst of 2,000 SYNs at
// once would only measure the listen backlog.
type dialer struct {
	addr string
	sem  chan struct{}
}

func newDialer(addr string) *dialer { return &dialer{addr: addr, sem: make(chan struct{}, 64)} }

func (d *dialer) dial(ctx context.Context) (*conn, error) {
	select {
	case d.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-d.sem }()
	nd := net.Dialer{Timeout: 5 * time.Second}
	c, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	return &conn{TCPConn: c.(*net.TCPConn)}, nil
}

// dialContext is an http.Transport's DialContext through the limiter, to
// the proxy whatever address net/http asks for.
func (d *dialer) dialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	c, err := d.dial(ctx)
	if err != nil {
		return nil, err
	}
	return c.TCPConn, nil
}

// send writes p within 10 s.
func (c *conn) send(p []byte) error {
	c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Write(p)
	return err
}

// response reads a response's status line and headers, and its body too
// when drain is set, before deadline.
func (c *conn) response(deadline time.Time, drain bool) (*http.Response, error) {
	c.SetReadDeadline(deadline)
	if c.br == nil {
		c.br = bufio.NewReader(c.TCPConn)
	}
	res, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return nil, err
	}
	if drain {
		_, err = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	return res, err
}

// reset closes the connection with a TCP reset instead of a FIN: the other
// way a client leaves.
func (c *conn) reset() {
	c.SetLinger(0)
	c.Close()
}

// outcome names what a client got when it got no response.
func outcome(err error) string {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return "error"
}

// head returns a request's head: method, target, Host, extra header lines
// ("Name: value") and the body's framing: a Content-Length when length >=
// 0, chunked when length is -1, none when length is -2.
func head(method, target, host string, extra []string, length int64) []byte {
	var b strings.Builder
	b.WriteString(method + " " + target + " HTTP/1.1\r\nHost: " + host + "\r\n")
	for _, h := range extra {
		b.WriteString(h + "\r\n")
	}
	switch {
	case length >= 0:
		b.WriteString("Content-Type: application/json\r\nContent-Length: " + strconv.FormatInt(length, 10) + "\r\n")
	case length == -1:
		b.WriteString("Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
	}
	b.WriteString("\r\n")
	return []byte(b.String())
}

// Body framings for head.
const (
	chunked = -1
	noBody  = -2
)

// messageBody returns a reader of a Messages request of exactly n bytes
// (n >= 128): JSON, as an SDK sends it, padded with one long user message.
func messageBody(n int64) io.Reader {
	const pre = `{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"`
	const post = `"}]}`
	return io.MultiReader(strings.NewReader(pre),
		io.LimitReader(filler{}, n-int64(len(pre)+len(post))), strings.NewReader(post))
}

// filler reads as an endless run of 'x'.
type filler struct{}

func (filler) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 'x'
	}
	return len(p), nil
}

// writeChunked writes r to w in HTTP/1.1 chunked encoding, 32 KiB chunks,
// and the last chunk.
func writeChunked(w io.Writer, r io.Reader) error {
	cw := httputil.NewChunkedWriter(w)
	if _, err := io.CopyBuffer(cw, r, make([]byte, 32<<10)); err != nil {
		return err
	}
	if err := cw.Close(); err != nil {
		return err
	}
	_, err := io.WriteString(w, "\r\n") // no trailers
	return err
}

// tally counts outcomes by group ("normal", "bodies") and label ("200",
// "timeout"). It is safe for concurrent use.
type tally struct {
	mu     sync.Mutex
	counts map[string]map[string]int
	groups []string // in order of first use
}

func newTally() *tally { return &tally{counts: map[string]map[string]int{}} }

func (t *tally) add(group, label string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	g, ok := t.counts[group]
	if !ok {
		g = map[string]int{}
		t.counts[group] = g
		t.groups = append(t.groups, group)
	}
	g[label]++
}

// status counts a response's status, or the outcome of its error.
func (t *tally) status(group string, res *http.Response, err error) {
	if err != nil {
		t.add(group, outcome(err))
		return
	}
	t.add(group, strconv.Itoa(res.StatusCode))
}

func (t *tally) get(group, label string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.counts[group][label]
}

// others counts the outcomes of group not in want.
func (t *tally) others(group string, want ...string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for label, c := range t.counts[group] {
		if !slices.Contains(want, label) {
			n += c
		}
	}
	return n
}

// String prints "group: 200×980 503×20; group2: ...".
func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var groups []string
	for _, g := range t.groups {
		var parts []string
		for label, c := range t.counts[g] {
			parts = append(parts, fmt.Sprintf("%s×%d", label, c))
		}
		s := sortedJoin(parts)
		if g != "" {
			s = g + " " + s
		}
		groups = append(groups, s)
	}
	return strings.Join(groups, "; ")
}

func sortedJoin(parts []string) string {
	slices.Sort(parts)
	return strings.Join(parts, " ")
}

// latencies collects durations. It is safe for concurrent use.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

func (l *latencies) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.d)
}

// quantile returns the q-quantile (nearest rank), 0 when empty.
func (l *latencies) quantile(q float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0
	}
	s := slices.Clone(l.d)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// String prints "p50 3ms p99 12ms max 40ms (n=80)".
func (l *latencies) String() string {
	if l.count() == 0 {
		return "-"
	}
	return fmt.Sprintf("p50 %s p99 %s max %s (n=%d)", msStr(l.quantile(0.5)), msStr(l.quantile(0.99)),
		msStr(l.quantile(1)), l.count())
}

func msStr(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1fms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.0fms", float64(d)/1e6)
}
