package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The loads: each kind of client the scenarios combine. A load runs until
// the stage's hold ends, counts what its clients got in the stage's tally
// under its own group, and returns once its clients are closed; no client
// waits past until+grace.

// stage is what one scenario's loads share.
type stage struct {
	ctx     context.Context    // the scenario's; cancelled if it must be cut short
	hold    context.Context    // done at until, when the abuse ends
	endHold context.CancelFunc // ends the hold early
	until   time.Time
	grace   time.Time // until plus the time given to answers still owed
	addr    string    // the proxy's
	d       *dialer
	up      *upstream
	out     *tally        // what the clients got, by load
	lat     *latencies    // normal requests' latencies; count 0 when none ran
	lag     *latencies    // how late SSE events arrived
	maxP99  time.Duration // -max-p99
	wg      sync.WaitGroup

	eventsGot, eventsWant atomic.Int64 // SSE events received, and expected
	trials                atomic.Int64 // ghost trials sent
	forwardedEarly        atomic.Int64 // ghost trials forwarded before their clients left: not ghosts

	mu    sync.Mutex
	notes []string // what the report says about the run
	fails []string // promises broken, beyond memory and health
}

func (st *stage) note(format string, args ...any) {
	st.mu.Lock()
	st.notes = append(st.notes, fmt.Sprintf(format, args...))
	st.mu.Unlock()
}

func (st *stage) fail(format string, args ...any) {
	st.mu.Lock()
	st.fails = append(st.fails, fmt.Sprintf(format, args...))
	st.mu.Unlock()
}

// spawn runs f as a load of the stage; finish waits for them all.
func (st *stage) spawn(f func()) {
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		f()
	}()
}

// each runs f(i) for i in [0, n) concurrently and returns when all have.
func each(n int, f func(i int)) {
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(i)
		}()
	}
	wg.Wait()
}

// sleepUntil waits for t or ctx, whichever comes first.
func sleepUntil(ctx context.Context, t time.Time) {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-ctx.Done():
	case <-timer.C:
	}
}

// streams holds n SSE streams open until the hold ends, an event every
// 100 ms, each read as it arrives (SPEC: streams up to max_connections).
func (st *stage) streams(n int) {
	tr := &http.Transport{DialContext: st.d.dialContext, DisableKeepAlives: true, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	const every = 100 * time.Millisecond
	each(n, func(i int) {
		length := time.Until(st.until)
		url := fmt.Sprintf("http://%s/v1/sse?every=%s&for=%s", st.addr, every, length)
		ctx, cancel := context.WithDeadline(st.ctx, st.grace)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		res, err := client.Do(req)
		if err != nil {
			st.out.add("streams", outcome(err))
			return
		}
		defer res.Body.Close()
		if res.StatusCode == http.StatusOK {
			st.eventsWant.Add(int64(length / every))
		}
		br := bufio.NewReader(res.Body)
		for {
			line, err := br.ReadSlice('\n')
			if sent, ok := bytes.CutPrefix(line, []byte(`data: {"sent":`)); ok {
				ns, _ := strconv.ParseInt(string(bytes.TrimRight(sent, "}\n")), 10, 64)
				st.lag.add(time.Since(time.Unix(0, ns)))
				st.eventsGot.Add(1)
			}
			if err == io.EOF {
				st.out.add("streams", strconv.Itoa(res.StatusCode))
				return
			}
			if err != nil {
				st.out.add("streams", strconv.Itoa(res.StatusCode)+"-cut:"+outcome(err))
				return
			}
		}
	})
}

// bodies sends 10 MiB request bodies (max_body_bytes) back to back from
// nChunked chunked and nSized Content-Length clients until the hold ends.
// The upstream drains each and answers.
func (st *stage) bodies(nChunked, nSized int) {
	tr := &http.Transport{DialContext: st.d.dialContext, DisableCompression: true, MaxIdleConnsPerHost: nChunked + nSized}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	each(nChunked+nSized, func(i int) {
		for st.hold.Err() == nil {
			ctx, cancel := context.WithDeadline(st.ctx, st.grace)
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+st.addr+"/v1/messages",
				io.NopCloser(messageBody(maxBodyBytes))) // a plain Reader: net/http sends it chunked
			group := "chunked"
			if i >= nChunked {
				req.ContentLength, group = maxBodyBytes, "sized"
			}
			req.Header.Set("Content-Type", "application/json")
			res, err := client.Do(req)
			if err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
			st.out.status("bodies "+group, res, err)
			cancel()
			if err != nil || res.StatusCode != http.StatusOK {
				// A client that is refused waits before it tries again
				// (the SDKs honour Retry-After; a short pause keeps the
				// pressure on).
				sleepUntil(st.hold, time.Now().Add(200*time.Millisecond))
			}
		}
	})
}

// slowUploaders opens n connections that each declare a 10 MiB body, send
// 1 MiB of it at once and then 8 bytes a second, until the hold ends. The
// proxy's 60 s deadlines do not fire within a scenario: what counts is that
// nobody else waits for them (SPEC: Slow uploads).
func (st *stage) slowUploaders(n int) {
	each(n, func(i int) {
		c, err := st.d.dial(st.ctx)
		if err != nil {
			st.out.add("slow", "dial:"+outcome(err))
			return
		}
		defer c.reset()
		body := messageBody(maxBodyBytes)
		go func() {
			c.SetWriteDeadline(st.until)
			c.Write(head("POST", "/v1/messages", st.addr, nil, maxBodyBytes))
			if _, err := io.CopyN(c, body, 1<<20); err != nil {
				return // the proxy has not taken it all yet: budget
			}
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			for {
				select {
				case <-st.hold.Done():
					return
				case <-tick.C:
					if _, err := io.CopyN(c, body, 8); err != nil {
						return
					}
				}
			}
		}()
		res, err := c.response(st.until, true)
		switch {
		case err == nil:
			st.out.add("slow", strconv.Itoa(res.StatusCode))
		case outcome(err) == "timeout":
			st.out.add("slow", "pending") // still uploading: as expected
		default:
			st.out.add("slow", outcome(err))
		}
	})
}

// floodHead is a request head of 99 fields (Host and 98 others) and about
// 31 KiB, just under the proxy's 32 KiB and 100 fields: about the most a
// client may make it hold per request without being refused.
func floodHead(addr, target string) []byte {
	const fields = 98
	value := strings.Repeat("Zm9vYmFyYmF6cXV4", 2000)[:31<<10/fields-len("X-Filler-00: \r\n")]
	extra := make([]string, fields)
	for i := range extra {
		extra[i] = fmt.Sprintf("X-Filler-%02d: %s", i, value)
	}
	return head("GET", target, addr, extra, noBody)
}

// floods opens n connections, each with a maximal request head, to a path
// the upstream holds until the hold ends: max_connections of them in
// flight, the rest waiting for a slot, all holding their headers. sent is
// done once every request is written (or failed).
func (st *stage) floods(n int, sent *sync.WaitGroup) {
	req := floodHead(st.addr, "/v1/hold")
	sent.Add(n)
	each(n, func(i int) {
		c, err := st.d.dial(st.ctx)
		if err == nil {
			defer c.reset()
			err = c.send(req)
		}
		sent.Done()
		if err != nil {
			st.out.add("floods", "send:"+outcome(err))
			return
		}
		res, err := c.response(st.grace, true)
		st.out.status("floods", res, err)
	})
}

// headerProbes sends n requests over the header limits, one at a time,
// spread over the rest of the hold: half with 101 fields, half with 33 KiB
// in 20 fields. Each must get the proxy's JSON 431 (SPEC: Limits under
// abuse), even while it is full.
func (st *stage) headerProbes(n int) {
	tooMany := make([]string, 100) // plus Host: 101 fields
	for i := range tooMany {
		tooMany[i] = fmt.Sprintf("X-T-%03d: 1", i)
	}
	tooBig := make([]string, 19) // plus Host: 20 fields, 33 KiB
	for i := range tooBig {
		tooBig[i] = fmt.Sprintf("X-Big-%02d: %s", i, strings.Repeat("b", 33<<10/19))
	}
	gap := time.Until(st.until) / time.Duration(n+1)
	for i := range n {
		kind, extra := "101 fields", tooMany
		if i%2 == 1 {
			kind, extra = "33 KiB", tooBig
		}
		res, err := st.probe(head("GET", "/v1/messages", st.addr, extra, noBody))
		switch {
		case err != nil:
			st.out.add("431 probes", outcome(err))
		case res.StatusCode == http.StatusRequestHeaderFieldsTooLarge && res.Header.Get("Content-Type") == "application/json":
			st.out.add("431 probes", "431")
		default:
			st.out.add("431 probes", strconv.Itoa(res.StatusCode)+"("+kind+", "+res.Header.Get("Content-Type")+")")
		}
		sleepUntil(st.hold, time.Now().Add(gap))
	}
}

// probe sends one request on a fresh connection and reads its answer.
func (st *stage) probe(req []byte) (*http.Response, error) {
	c, err := st.d.dial(st.ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.send(req); err != nil {
		return nil, err
	}
	return c.response(time.Now().Add(5*time.Second), true)
}

// nonReaders opens n connections that ask for a 64 MiB response, read its
// headers, and then never read again until the hold ends. Their 60 s write
// timeout does not fire within a scenario; their memory shows.
func (st *stage) nonReaders(n int) {
	each(n, func(i int) {
		c, err := st.d.dial(st.ctx)
		if err == nil {
			defer c.reset()
			err = c.send(head("GET", "/v1/big?bytes="+strconv.Itoa(64<<20), st.addr, nil, noBody))
		}
		if err != nil {
			st.out.add("non-readers", "send:"+outcome(err))
			return
		}
		res, err := c.response(time.Now().Add(10*time.Second), false)
		st.out.status("non-readers", res, err)
		sleepUntil(st.hold, st.until)
	})
}

// normal sends a 1 KiB Messages request every 100 ms, one at a time, on a
// keep-alive connection as an SDK does, until the hold ends, and records
// each one's latency. Its dials skip the harness's dial limiter: it must
// never wait behind the abusive clients' connections.
func (st *stage) normal() {
	tr := &http.Transport{DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-st.hold.Done():
			return
		case <-tick.C:
		}
		req, _ := http.NewRequestWithContext(st.ctx, http.MethodPost, "http://"+st.addr+"/v1/messages", messageBody(1<<10))
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		res, err := client.Do(req)
		if err == nil {
			_, err = io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
		st.lat.add(time.Since(start))
		st.out.status("normal", res, err)
	}
}

// Ghost trials (SPEC: a request whose client left before it was forwarded
// is never sent upstream). Each trial sends a request to /v1/ghost that
// must wait in the proxy, then leaves; the upstream counts any that
// arrive.

// ghostBudgetBody is the size of a "budget" ghost's body: a first chunk
// (16 KiB), a full second chunk (64 KiB) and a little more; small enough
// for the socket buffers to take whole while the proxy reads none of it.
const ghostBudgetBody = 96 << 10

// ghost sends trial i of a kind and returns its connection, open. The
// kinds: "get" (no body), "post" and "chunked" (1 KiB, Content-Length or
// chunked), each sent whole to wait for a slot; "budget", sent whole to
// wait for body budget.
func (st *stage) ghost(kind string, i int) (*conn, error) {
	c, err := st.d.dial(st.ctx)
	if err != nil {
		return nil, err
	}
	target := fmt.Sprintf("/v1/ghost?kind=%s&i=%d", kind, i)
	switch kind {
	case "get":
		err = c.send(head("GET", target, st.addr, nil, noBody))
	case "post":
		err = c.send(head("POST", target, st.addr, nil, 1<<10))
		if err == nil {
			_, err = io.Copy(c, messageBody(1<<10))
		}
	case "chunked":
		err = c.send(head("POST", target, st.addr, nil, chunked))
		if err == nil {
			err = writeChunked(c, messageBody(1<<10))
		}
	case "budget":
		// The whole body is sent: its first 16 KiB chunk fits in the
		// reserve, its second (64 KiB) must wait for room, which the
		// stage has made sure is taken. Once room frees, the proxy finds
		// the whole body in its socket, and only the departure tells it
		// not to forward the request.
		err = c.send(head("POST", target, st.addr, nil, ghostBudgetBody))
		if err == nil {
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, err = io.Copy(c, messageBody(ghostBudgetBody))
		}
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// leave closes the ghosts' connections, every other one with a reset.
func leave(ghosts []*conn) {
	for i, c := range ghosts {
		if c == nil {
			continue
		}
		if i%2 == 0 {
			c.Close()
		} else {
			c.reset()
		}
	}
}

// ghosts sends n trials of kind concurrently and returns their open
// connections (nil for a trial that failed to send).
func (st *stage) ghosts(kind string, n int) []*conn {
	conns := make([]*conn, n)
	var failed atomic.Int64
	each(n, func(i int) {
		c, err := st.ghost(kind, i)
		if err != nil {
			failed.Add(1)
			return
		}
		conns[i] = c
		st.trials.Add(1)
	})
	if f := failed.Load(); f > 0 {
		st.note("%d of %d %s ghost trials failed to send", f, n, kind)
	}
	return conns
}

// fillers sends n requests to /v1/hold, with a body of size bytes when
// size > 0, and counts their answers under group once the upstream lets
// them go. They hold slots, and with bodies the body budget, for as long
// as the stage needs. A filler the memory guard refuses (503) tries again
// 100 ms later, until the hold ends: the stage needs them in place, and
// the refusals are counted as "503 retried".
func (st *stage) fillers(group string, n int, size int64) {
	each(n, func(i int) {
		for {
			res, err := st.fill("/v1/hold?fill="+strconv.Itoa(i), size)
			if err == nil && res.StatusCode == http.StatusServiceUnavailable && st.hold.Err() == nil {
				st.out.add(group, "503 retried")
				sleepUntil(st.hold, time.Now().Add(100*time.Millisecond))
				continue
			}
			st.out.status(group, res, err)
			return
		}
	})
}

// fill sends one filler request and waits for its answer.
func (st *stage) fill(target string, size int64) (*http.Response, error) {
	c, err := st.d.dial(st.ctx)
	if err != nil {
		return nil, err
	}
	defer c.reset()
	if size == 0 {
		err = c.send(head("GET", target, st.addr, nil, noBody))
	} else if err = c.send(head("POST", target, st.addr, nil, size)); err == nil {
		go func() { // written as the proxy takes it
			c.SetWriteDeadline(st.grace)
			io.Copy(c, messageBody(size))
		}()
	}
	if err != nil {
		return nil, err
	}
	return c.response(st.grace, true)
}
