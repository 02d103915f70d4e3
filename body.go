package main

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Request bodies are read into memory before they are forwarded, so that a
// retry can replay them (SPEC: Limits under abuse). They are held in chunks
// taken from a shared budget as the bytes arrive: a body holds memory and
// budget only for what it has received, plus at most one chunk, whatever
// its framing, and is never copied.

// Chunk sizes: a body's first chunk is small, so that many requests can be
// starting at once; the later ones are larger, so that a 10 MiB body is
// 160 allocations, not 640.
const (
	firstChunkSize = 16 << 10
	chunkSize      = 64 << 10
)

// lingerTime is how long the rest of a body over max_body_bytes is read
// and discarded after the 413, before the connection closes (nginx's
// lingering_close, shorter).
const lingerTime = 500 * time.Millisecond

// minUploadRate is the slowest average rate at which a request body may
// arrive once timeout_secs have passed (Apache mod_reqtimeout's MinRate):
// 1 KiB/s. An upload slower than that holds a slot and its budget for
// nothing.
const minUploadRate = 1 << 10

// Errors of reading a request body, each answered with its own status.
var (
	errBodyTooLarge = errors.New("request body over max_body_bytes")               // 413
	errBodyStalled  = errors.New("request body stalled")                           // 408
	errBodyTooSlow  = errors.New("request body too slow")                          // 408
	errNoBodyRoom   = errors.New("no room in the body budget within timeout_secs") // 503
	errOverloaded   = errors.New("proxy overloaded: memory near its limit")        // 503
)

// requestBody is a request body held in memory: chunks filled in order,
// each but the last full.
type requestBody struct {
	chunks  [][]byte
	size    int64
	held    int64 // budget held: the chunks' capacity
	reading bool  // its first chunk is taken, and reading has not ended
	done    bool  // read in whole
}

// reader returns a new reader of the whole body.
func (b *requestBody) reader() *chunkReader { return &chunkReader{chunks: b.chunks} }

// chunkReader reads the chunks of a requestBody in order.
type chunkReader struct {
	chunks [][]byte
	off    int // in chunks[0]
}

func (r *chunkReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && len(r.chunks) > 0 {
		c := copy(p[n:], r.chunks[0][r.off:])
		n += c
		if r.off += c; r.off == len(r.chunks[0]) {
			r.chunks, r.off = r.chunks[1:], 0
		}
	}
	if n == 0 && len(p) > 0 {
		return 0, io.EOF
	}
	return n, nil
}

// readBody reads r's body into x.body, chunk by chunk: each chunk's room is
// taken from the budget before it is allocated (waiting for at most
// timeout_secs), and the upload must keep its pace (uploadBody). A
// Messages body is scanned for "stream" as it arrives. What it holds stays
// in x.body, to be released by the caller even after an error.
func (s *server) readBody(x *exchange, w http.ResponseWriter, r *http.Request, scan *streamScanner) (err error) {
	if r.Body == nil || r.Body == http.NoBody {
		return nil
	}
	limit := s.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		// Refused before a byte is read, so the client is never sent
		// 100 Continue and the upstream is never contacted.
		return errBodyTooLarge
	}
	up := &x.upload
	*up = uploadBody{r: r.Body, timeout: s.cfg.Timeout, start: time.Now()}
	up.conn, _ = w.(readDeadliner)
	defer func() { up.end(err) }()
	b := &x.body
	defer func() { s.endRead(b, err) }()
	for {
		first := len(b.chunks) == 0
		n := b.nextChunk(r.ContentLength, limit)
		if n == 0 {
			return nil
		}
		if !first && s.guard.overloaded() {
			return errOverloaded // a first chunk was admitted with its request
		}
		up.setDeadline(time.Time{}) // waiting for room is the proxy's doing, not a stall
		waited, err := s.budget.acquire(r.Context(), s.guard.waiting(), n, first, s.cfg.Timeout)
		up.start = up.start.Add(waited) // the proxy's wait is not the client's slowness
		up.waited += waited
		if err != nil {
			return err
		}
		b.reading = b.reading || first
		chunk := make([]byte, n)
		got, err := io.ReadFull(up, chunk)
		if got == 0 {
			s.budget.release(n, false) // a body of unknown length ended at a chunk's end
		} else {
			b.chunks = append(b.chunks, chunk[:got])
			b.size += int64(got)
			b.held += n
			if scan != nil {
				scan.write(chunk[:got])
			}
		}
		switch {
		case b.size > limit:
			return errBodyTooLarge
		case err == io.ErrUnexpectedEOF && r.ContentLength < 0, err == io.EOF:
			return nil // a body of unknown length ended
		case err != nil:
			return up.explain(err)
		}
	}
}

// nextChunk returns the size of the body's next chunk: exactly what is
// declared, or up to one byte past the limit for a body of unknown length,
// so that an overrun shows.
func (b *requestBody) nextChunk(declared, limit int64) int64 {
	n := int64(chunkSize)
	if len(b.chunks) == 0 {
		n = firstChunkSize
	}
	if declared >= 0 {
		return min(n, declared-b.size)
	}
	return min(n, limit+1-b.size)
}

// endRead ends the read of a body: its room is settled with the budget,
// and a body that failed is dropped.
func (s *server) endRead(b *requestBody, err error) {
	if !b.reading {
		return
	}
	b.reading, b.done = false, err == nil
	s.budget.endRead(b.held, b.done)
	if !b.done {
		*b = requestBody{} // its room is back in the budget
	}
}

// dropBody drops a request body and returns its budget.
func (s *server) dropBody(b *requestBody) {
	s.budget.release(b.held, b.done)
	*b = requestBody{}
}

// uploadBody reads the client's request body against two deadlines on
// the client connection, moved before every Read: no byte for timeout_secs
// (stalled), and, once timeout_secs have passed since the body began, an
// average below minUploadRate (too slow). There is no ReadTimeout, which
// would cut streams; this is the only limit on how long a body may take.
type uploadBody struct {
	r       io.Reader
	conn    readDeadliner // nil if the ResponseWriter cannot set one
	timeout time.Duration
	start   time.Time     // when the body began, moved on by the proxy's own waits
	n       int64         // bytes read
	slow    bool          // the deadline set is the rate's, not the stall's
	waited  time.Duration // in all, for room in the budget
}

// readDeadliner is net/http's HTTP/1 ResponseWriter, which sets the client
// connection's read deadline.
type readDeadliner interface{ SetReadDeadline(time.Time) error }

// end sets the connection's read deadline once the body has been read, or
// has failed.
func (u *uploadBody) end(err error) {
	switch err {
	case nil:
		u.setDeadline(time.Time{}) // the connection lives on
	case errBodyTooLarge:
		// After the 413, net/http reads and discards up to 256 KiB of what
		// is left of the body, then closes the connection: a client still
		// sending the end of a chunked body gets to read the answer
		// instead of a reset. lingerTime bounds that.
		u.setDeadline(time.Now().Add(lingerTime))
	default:
		// Any other failed body is not drained: the connection closes
		// after the answer (under a flood of bodies, draining them would
		// only feed the flood).
		u.setDeadline(time.Unix(1, 0))
	}
}

func (u *uploadBody) setDeadline(t time.Time) {
	if u.conn != nil {
		u.conn.SetReadDeadline(t)
	}
}

func (u *uploadBody) Read(p []byte) (int, error) {
	stall := time.Now().Add(u.timeout)
	// n bytes at minUploadRate pay for n/minUploadRate seconds from the
	// start, and the first timeout_secs are free.
	paid := max(u.timeout, time.Duration(u.n)*time.Second/minUploadRate)
	slow := u.start.Add(paid)
	// Which one fires, for the message: a body that sent nothing since it
	// began meets both at once, and has stalled.
	u.slow = stall.Sub(slow) > u.timeout/10
	if u.slow {
		u.setDeadline(slow)
	} else {
		u.setDeadline(stall)
	}
	n, err := u.r.Read(p)
	u.n += int64(n)
	return n, err
}

// explain turns a read error into errBodyStalled or errBodyTooSlow when a
// deadline expired, and leaves others alone.
func (u *uploadBody) explain(err error) error {
	var ne interface{ Timeout() bool }
	if !errors.As(err, &ne) || !ne.Timeout() {
		return err
	}
	if u.slow {
		return errBodyTooSlow
	}
	return errBodyStalled
}

// uploadMessage is the client-facing text for an upload that timed out.
func (u *uploadBody) message(err error) string {
	if err == errBodyTooSlow {
		return "request body too slow: " + strconv.FormatInt(u.n, 10) + " bytes in " +
			strconv.FormatFloat(time.Since(u.start).Seconds(), 'f', 1, 64) + "s, under 1 KiB/s"
	}
	return "request body stalled: no data for " + formatSeconds(u.timeout)
}

// bodyBudget bounds the memory held by buffered request bodies across all
// requests (SPEC: 64 MiB). Its last quarter, the reserve, is kept for
// bodies' first chunks: however many large or slow uploads hold the rest,
// a small request still finds room at once. Waiters are served in order,
// each as soon as it fits, so a small chunk never waits behind a large one.
//
// Bodies hold what they have received, so they can wait on each other:
// when every body still being read waits for room and none is done (done
// bodies free their room once their response headers arrive), none can
// ever finish. The newest waiter is then refused at once (503, retry
// later), and its room goes to the others, until one can go on.
type bodyBudget struct {
	mu      sync.Mutex
	free    int64
	reserve int64
	waiters []*budgetWaiter
	readers int           // bodies being read that hold room
	later   int           // waiters for a body's later chunk
	done    int64         // room held by bodies read in whole
	inUse   *atomic.Int64 // gauge: bytes taken
	waiting *atomic.Int64 // gauge: acquire calls waiting
}

type budgetWaiter struct {
	n       int64
	first   bool          // a body's first chunk: may use the reserve
	ready   chan struct{} // closed once n bytes are taken for the waiter, or it is refused
	refused bool          // chosen to break a deadlock
}

// newBodyBudget returns a budget of size bytes, reserve of them for first
// chunks, that keeps the gauges inUse and waiting.
func newBodyBudget(size, reserve int64, inUse, waiting *atomic.Int64) *bodyBudget {
	return &bodyBudget{free: size, reserve: reserve, inUse: inUse, waiting: waiting}
}

// budgetReserve is the reserve of a budget of size bytes for bodies of up
// to maxBody bytes: a quarter, less if such a body would not fit beside it
// (max_body_bytes over 48 MiB gives the reserve up).
func budgetReserve(size, maxBody int64) int64 {
	return max(min(size/4, size-maxBody-chunkSize), 0)
}

// fits reports whether n bytes can be taken now.
func (b *bodyBudget) fits(n int64, first bool) bool {
	if first {
		return n <= b.free
	}
	return n+b.reserve <= b.free
}

// acquire takes n bytes for a body, its first chunk if first, waiting
// until they fit, ctx is done (its error), overload is closed
// (errOverloaded), timeout passes or waiting would deadlock
// (errNoBodyRoom). It returns how long it waited. A body that got its
// first chunk must call endRead when it is read.
func (b *bodyBudget) acquire(ctx context.Context, overload <-chan struct{}, n int64, first bool, timeout time.Duration) (time.Duration, error) {
	b.mu.Lock()
	if len(b.waiters) == 0 && b.fits(n, first) {
		b.grant(n, first)
		b.mu.Unlock()
		return 0, nil
	}
	w := &budgetWaiter{n: n, first: first, ready: make(chan struct{})}
	b.waiters = append(b.waiters, w)
	if !first {
		b.later++
	}
	b.grantLocked()
	b.mu.Unlock()

	start := time.Now()
	b.waiting.Add(1)
	defer b.waiting.Add(-1)
	t := time.NewTimer(timeout)
	defer t.Stop()
	var err error
	select {
	case <-w.ready:
		if w.refused {
			return time.Since(start), errNoBodyRoom
		}
		return time.Since(start), nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-overload:
		err = errOverloaded
	case <-t.C:
		err = errNoBodyRoom
	}
	b.mu.Lock()
	select {
	case <-w.ready: // granted or refused meanwhile
		if !w.refused {
			b.take(-n)
			if first {
				b.readers--
			}
		}
	default:
		b.remove(w)
	}
	b.grantLocked()
	b.mu.Unlock()
	return time.Since(start), err
}

// endRead ends the reading of a body that got its first chunk and holds
// held bytes: kept until release if it was read in whole (done), returned
// now if not.
func (b *bodyBudget) endRead(held int64, done bool) {
	b.mu.Lock()
	b.readers--
	if done {
		b.done += held
	} else {
		b.take(-held)
	}
	b.grantLocked()
	b.mu.Unlock()
}

// release returns n bytes of a body, done if it was read in whole.
func (b *bodyBudget) release(n int64, done bool) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.take(-n)
	if done {
		b.done -= n
	}
	b.grantLocked()
	b.mu.Unlock()
}

// take takes n bytes (gives them back if n < 0); b.mu is held.
func (b *bodyBudget) take(n int64) {
	b.free -= n
	b.inUse.Add(n)
}

// grant takes n bytes for a waiter or a newcomer; b.mu is held.
func (b *bodyBudget) grant(n int64, first bool) {
	b.take(n)
	if first {
		b.readers++
	}
}

// remove takes w off the queue; b.mu is held.
func (b *bodyBudget) remove(w *budgetWaiter) {
	for i, o := range b.waiters {
		if o == w {
			b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
			if !w.first {
				b.later--
			}
			return
		}
	}
}

// grantLocked gives room to every waiter that fits, in order, then breaks
// a deadlock if there is one.
func (b *bodyBudget) grantLocked() {
	kept := b.waiters[:0]
	for _, w := range b.waiters {
		if b.fits(w.n, w.first) {
			b.grant(w.n, w.first)
			if !w.first {
				b.later--
			}
			close(w.ready)
		} else {
			kept = append(kept, w)
		}
	}
	clear(b.waiters[len(kept):])
	b.waiters = kept
	if b.later > 0 && b.later == b.readers && b.done == 0 {
		// Every body being read waits, and no room will come back:
		// refuse the newest, whose room then goes to the others.
		for i := len(b.waiters) - 1; i >= 0; i-- {
			if w := b.waiters[i]; !w.first {
				b.remove(w)
				w.refused = true
				close(w.ready)
				break
			}
		}
	}
}
