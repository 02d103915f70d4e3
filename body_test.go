package main

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestBodyBudget(t *testing.T) {
	var inUse, waiting atomic.Int64
	b := newBodyBudget(100, 25, &inUse, &waiting) // the last 25 bytes are the reserve
	ctx := t.Context()
	must := func(n int64, first bool) {
		t.Helper()
		if _, err := b.acquire(ctx, nil, n, first, time.Second); err != nil {
			t.Fatalf("acquire(%d, first %v): %v", n, first, err)
		}
	}
	wait := func(n int64, first bool, timeout time.Duration) chan error {
		done := make(chan error, 1)
		go func() { _, err := b.acquire(ctx, nil, n, first, timeout); done <- err }()
		return done
	}
	must(10, true) // body A
	must(50, false)
	must(10, true) // body B
	// B's next chunk must leave the reserve: 10 + 25 > 30 free.
	bNext := wait(10, false, 10*time.Second)
	waitGauge(t, &waiting, 1)
	// A first chunk may use the reserve, and does not wait behind it.
	must(20, true)      // body C
	b.endRead(60, true) // A is read: its 60 bytes come back with its response headers
	b.release(60, true) // ...now
	if err := <-bNext; err != nil {
		t.Fatalf("B's next chunk got no room once it fitted: %v", err)
	}
	// B and C are being read, 60 bytes free. One that cannot fit in time
	// gives up with errNoBodyRoom.
	if _, err := b.acquire(ctx, nil, 50, false, 50*time.Millisecond); err != errNoBodyRoom {
		t.Errorf("acquire beyond the budget = %v; want errNoBodyRoom", err)
	}
	// C waits for 45; then B waits for 40: both bodies being read wait,
	// and no room will come back. The newest is refused at once...
	cNext := wait(45, false, 10*time.Second)
	waitGauge(t, &waiting, 1)
	if err := <-wait(40, false, 10*time.Second); err != errNoBodyRoom {
		t.Fatalf("deadlocked waiter: %v; want errNoBodyRoom at once", err)
	}
	// ...and once B gives its room back, C goes on.
	b.endRead(20, false)
	if err := <-cNext; err != nil {
		t.Fatalf("C got no room after B gave up: %v", err)
	}
	b.endRead(65, true)
	b.release(65, true)
	if inUse.Load() != 0 || waiting.Load() != 0 || b.readers != 0 || b.done != 0 {
		t.Errorf("in use %d, waiting %d, %d readers, %d done after everything was released; want all 0",
			inUse.Load(), waiting.Load(), b.readers, b.done)
	}
	// Nothing is left queued: the whole budget is taken at once.
	if waited, err := b.acquire(ctx, nil, 100, true, 50*time.Millisecond); err != nil || waited != 0 {
		t.Errorf("acquire of the whole budget once all was released: waited %v, %v; want it taken at once", waited, err)
	}
}

func TestChunkReader(t *testing.T) {
	chunks := [][]byte{[]byte("abc"), []byte("de"), []byte("fghij")}
	for _, size := range []int{1, 2, 4, 64} {
		r := (&requestBody{chunks: chunks}).reader()
		var got []byte
		buf := make([]byte, size)
		for {
			n, err := r.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil || n == 0 {
				t.Fatalf("Read(%d bytes) = %d, %v", size, n, err)
			}
		}
		if string(got) != "abcdefghij" {
			t.Errorf("read in %d-byte pieces: %q; want abcdefghij", size, got)
		}
	}
}

func TestBodyLimit(t *testing.T) {
	const limit = 10 << 20
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	c := testClient(t)
	exact := bytes.Repeat([]byte("a"), limit)

	for _, chunked := range []bool{false, true} {
		name := "content-length"
		if chunked {
			name = "chunked"
		}
		t.Run(name+"/exact limit passes", func(t *testing.T) {
			res, err := c.Do(bodyRequest(t, p.url, exact, chunked))
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			_, got := u.request()
			if res.StatusCode != 200 || !bytes.Equal(got, exact) {
				t.Fatalf("status %d, upstream got %d bytes; want 200 and all %d\n%s", res.StatusCode, len(got), limit, p.logs.String())
			}
		})
		t.Run(name+"/one byte more is refused", func(t *testing.T) {
			before := u.hits.Load()
			res, err := c.Do(bodyRequest(t, p.url, append(exact, 'b'), chunked))
			if err != nil {
				t.Fatal(err)
			}
			e := readError(t, res, http.StatusRequestEntityTooLarge)
			if e.Error.Message != "request body exceeds 10485760 bytes" {
				t.Errorf("message = %q", e.Error.Message)
			}
			if u.hits.Load() != before {
				t.Error("the upstream was contacted")
			}
		})
	}
	p.logs.waitRequests(t, 4)
	m := metricsText(t, p)
	if got := metricValue(m, `proxy_upstream_errors_total{error_type="invalid_request"}`); got != "2" {
		t.Errorf("invalid_request errors = %q; want 2", got)
	}
	if got := metricValue(m, `proxy_requests_total{status="413",method="POST"}`); got != "2" {
		t.Errorf("413s counted %q; want 2", got)
	}
}

func bodyRequest(t testing.TB, base string, body []byte, chunked bool) *http.Request {
	var r io.Reader = bytes.NewReader(body)
	if chunked {
		r = io.MultiReader(r) // hides the length: sent chunked
	}
	req, err := http.NewRequest("POST", base+"/v1/messages", r)
	if err != nil {
		t.Fatal(err)
	}
	if chunked && req.ContentLength != 0 {
		t.Fatal("request is not chunked")
	}
	return req
}

func TestExpectContinueBodyTooLarge(t *testing.T) {
	// A declared body over max_body_bytes is refused before net/http sends
	// 100 Continue, so the client never sends it; the connection is closed
	// after the 413, since the unsent body cannot be skipped.
	u := newEchoUpstream(t)
	p := startProxy(t, testConfig(t, u.URL), testTuning)
	raw := rawExchange(t, p.addr, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"Content-Length: 10485761\r\nExpect: 100-continue\r\n\r\n", 5*time.Second)
	if !strings.HasPrefix(raw, "HTTP/1.1 413 Request Entity Too Large\r\n") || strings.Contains(raw, "100 Continue") {
		t.Fatalf("client got %q; want a 413 and no 100 Continue", raw)
	}
	res, err := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), nil)
	if err != nil {
		t.Fatalf("response %q does not parse: %v", raw, err)
	}
	if e := readError(t, res, http.StatusRequestEntityTooLarge); e.Error.Message != "request body exceeds 10485760 bytes" {
		t.Errorf("message = %q", e.Error.Message)
	}
	if n := u.hits.Load(); n != 0 {
		t.Errorf("upstream saw %d requests; want none", n)
	}
	p.logs.waitRequests(t, 1)
	checkMetrics(t, p, map[string]string{`proxy_upstream_errors_total{error_type="invalid_request"}`: "1"})
}

func TestBodyHoldsItsSizeWhateverItsFraming(t *testing.T) {
	// A body holds budget, and memory, for what it received plus at most
	// one chunk: a chunked body no longer reserves max_body_bytes, nor
	// grows by doubling.
	tests := []struct {
		name    string
		size    int
		chunked bool
		most    int64 // budget held while the request waits for headers
	}{
		{"1 KiB with Content-Length", 1 << 10, false, 1 << 10},
		{"1 KiB chunked", 1 << 10, true, firstChunkSize},
		{"1 MiB with Content-Length", 1 << 20, false, 1 << 20},
		{"1 MiB chunked", 1 << 20, true, 1<<20 + chunkSize},
		{"1 MiB and a byte, chunked", 1<<20 + 1, true, 1<<20 + chunkSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up, entered, release := holdingUpstream(t)
			p := startProxy(t, testConfig(t, up.URL), testTuning)
			done := make(chan struct{})
			go func() {
				defer close(done)
				res, err := testClient(t).Do(bodyRequest(t, p.url, bytes.Repeat([]byte("b"), tt.size), tt.chunked))
				if err == nil {
					res.Body.Close()
				}
			}()
			<-entered
			if got := p.srv.metrics.bodyBudget.Load(); got < int64(tt.size) || got > tt.most {
				t.Errorf("body budget holds %d bytes for a %d-byte body; want %d to %d", got, tt.size, tt.size, tt.most)
			}
			close(release)
			<-done
		})
	}
}

func TestStalledOrSlowUploadIs408(t *testing.T) {
	tests := []struct {
		name    string
		head    string        // request line and headers
		piece   string        // sent every interval
		every   time.Duration // 0: once, then nothing
		message string        // prefix
	}{
		{"stalls, Content-Length", "Content-Length: 100000\r\n", "abc", 0, "request body stalled: no data for 300ms"},
		{"stalls, chunked", "Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n", 0, "request body stalled: no data for 300ms"},
		{"trickles under 1 KiB/s", "Content-Length: 100000\r\n", "0123456789", 20 * time.Millisecond, "request body too slow: "},
		{"trickles under 1 KiB/s, chunked", "Transfer-Encoding: chunked\r\n", "a\r\n0123456789\r\n", 20 * time.Millisecond, "request body too slow: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := newEchoUpstream(t)
			cfg := testConfig(t, u.URL)
			cfg.Timeout = 300 * time.Millisecond
			cfg.MaxConnections = 1
			p := startProxy(t, cfg, testTuning)
			c, err := net.Dial("tcp", p.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, "POST /v1/messages HTTP/1.1\r\nHost: x\r\n"+tt.head+"\r\n"+tt.piece)
			stop := make(chan struct{})
			defer close(stop)
			if tt.every > 0 {
				go func() {
					tick := time.NewTicker(tt.every)
					defer tick.Stop()
					for {
						select {
						case <-stop:
							return
						case <-tick.C:
							if _, err := io.WriteString(c, tt.piece); err != nil {
								return
							}
						}
					}
				}()
			}
			start := time.Now()
			res, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("no response: %v\n%s", err, p.logs.String())
			}
			e := readError(t, res, http.StatusRequestTimeout)
			if !strings.HasPrefix(e.Error.Message, tt.message) {
				t.Errorf("message = %q; want %q…", e.Error.Message, tt.message)
			}
			if elapsed := time.Since(start); elapsed < cfg.Timeout {
				t.Errorf("refused after %v; want no sooner than timeout_secs (%v)", elapsed, cfg.Timeout)
			}
			if u.hits.Load() != 0 {
				t.Error("the upload reached the upstream")
			}
			if l := p.logs.waitRequests(t, 1)[0]; l["status"] != float64(408) {
				t.Errorf("log line %v; want status 408", l)
			}
			checkMetrics(t, p, map[string]string{
				`proxy_refused_total{reason="body_too_slow"}`:               "1",
				`proxy_upstream_errors_total{error_type="invalid_request"}`: "1",
			})
			// The one slot and the budget are free again.
			send(t, p, u, "POST", "/v1/after", nil)
			if n := p.srv.metrics.bodyBudget.Load(); n != 0 {
				t.Errorf("body budget has %d bytes in use; want 0", n)
			}
		})
	}
}

func TestSteadyUploadOutlastsTimeout(t *testing.T) {
	// An upload above 1 KiB/s may take as long as it needs.
	u := newEchoUpstream(t)
	cfg := testConfig(t, u.URL)
	cfg.Timeout = 200 * time.Millisecond
	p := startProxy(t, cfg, testTuning)
	const pieces, piece = 20, 100 // 2,000 bytes over 600 ms: 3.3 KB/s
	pr, pw := io.Pipe()
	go func() {
		for range pieces {
			time.Sleep(30 * time.Millisecond) // the client's own pace
			pw.Write(bytes.Repeat([]byte("u"), piece))
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", p.url+"/v1/files", pr)
	req.ContentLength = pieces * piece
	res, err := testClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if _, got := u.request(); res.StatusCode != 200 || len(got) != pieces*piece {
		t.Fatalf("status %d, upstream got %d bytes; want 200 and %d", res.StatusCode, len(got), pieces*piece)
	}
}

func TestBodyBudgetWaitsForRoom(t *testing.T) {
	entered := make(chan string, 4)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		entered <- r.URL.Path
		<-release
	}))
	t.Cleanup(up.Close)
	cfg := testConfig(t, up.URL)
	cfg.MaxBodyBytes = 1 << 20
	tun := testTuning
	tun.bodyBudget = 1 << 20 // room for one body at a time, with the reserve for first chunks
	p := startProxy(t, cfg, tun)
	c := testClient(t)
	body := bytes.Repeat([]byte("x"), 600<<10)
	done := make(chan int, 2)
	post := func(path string) {
		res, err := c.Post(p.url+path, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			done <- 0
			return
		}
		res.Body.Close()
		done <- res.StatusCode
	}
	next := func() string {
		select {
		case got := <-entered:
			return got
		case <-time.After(10 * time.Second):
			t.Fatal("no request reached the upstream: is the budget leaking?")
			return ""
		}
	}
	go post("/first")
	if got := next(); got != "/first" {
		t.Fatalf("upstream got %s first", got)
	}
	go post("/second")
	waitGauge(t, &p.srv.metrics.waiting[waitBodyBudget], 1)
	select {
	case got := <-entered:
		t.Fatalf("%s reached the upstream while the budget was full", got)
	default:
	}
	close(release)
	if got := next(); got != "/second" {
		t.Fatalf("upstream got %s; want /second once room was freed", got)
	}
	for range 2 {
		if code := <-done; code != 200 {
			t.Errorf("status %d; want 200", code)
		}
	}
}

// A request's body is needed only until its response headers arrive (no
// attempt follows), so a long stream does not hold its share of the budget.
func TestBodyBudgetReleasedOnceHeadersArrive(t *testing.T) {
	entered := make(chan string, 2)
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: started\n\n")
		w.(http.Flusher).Flush()
		entered <- r.URL.Path
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() { close(release) })
	cfg := testConfig(t, up.URL)
	cfg.MaxBodyBytes = 1 << 20
	cfg.Timeout = time.Minute // the first stream stays open, silent, throughout
	tun := testTuning
	tun.bodyBudget = 1 << 20 // room for one body at a time, with the reserve for first chunks
	p := startProxy(t, cfg, tun)
	c := testClient(t)
	body := bytes.Repeat([]byte("x"), 600<<10)
	for _, path := range []string{"/first", "/second"} {
		res, err := c.Post(p.url+path, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		select {
		case got := <-entered:
			if got != path {
				t.Fatalf("upstream got %s; want %s", got, path)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s never reached the upstream: the first stream still holds the body budget", path)
		}
	}
}

func TestSlowUploadersDoNotDelayASmallPost(t *testing.T) {
	// Half of max_connections upload large bodies and stall once the
	// budget outside the reserve is theirs (the last one waits for room);
	// a 1 KiB POST is still answered at once, before any of them is.
	u := newEchoUpstream(t)
	cfg := testConfig(t, u.URL)
	cfg.MaxConnections = 6
	cfg.Timeout = 5 * time.Second
	cfg.MaxBodyBytes = 512 << 10
	tun := testTuning
	tun.bodyBudget = 1 << 20 // 768 KiB outside the reserve
	p := startProxy(t, cfg, tun)
	answered := make(chan string, 3)
	for i, held := range []int64{300 << 10, 600 << 10, -1} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go func() {
			io.WriteString(c, "POST /v1/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 512000\r\n\r\n")
			c.Write(bytes.Repeat([]byte("s"), 300<<10)) // then nothing more
			res, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err == nil {
				answered <- "uploader " + strconv.Itoa(i) + ": " + res.Status
			}
		}()
		// One after the other: each has received its 300 KiB, and the
		// last waits for room.
		ok := pollGauge(&p.srv.metrics.bodyBudget, func(n int64) bool { return n >= held })
		if held < 0 {
			ok = pollGauge(&p.srv.metrics.waiting[waitBodyBudget], func(n int64) bool { return n == 1 })
		}
		if !ok {
			t.Fatalf("uploader %d: the budget never held its bytes\n%s", i, metricsText(t, p))
		}
	}
	res, err := testClient(t).Post(p.url+"/v1/messages", "application/json", bytes.NewReader(bytes.Repeat([]byte(" "), 1<<10)))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 200 {
		t.Fatalf("small POST: status %d; want 200", res.StatusCode)
	}
	select {
	case a := <-answered:
		t.Fatalf("%s before the small POST: it waited for them", a)
	default:
	}
	if n := p.srv.metrics.bodyBudget.Load(); n > 1<<20 {
		t.Errorf("body budget holds %d bytes; want at most its 1 MiB", n)
	}
}

func TestNoRoomForTheBodyIs503(t *testing.T) {
	up, entered, _ := holdingUpstream(t)
	cfg := testConfig(t, up.URL)
	cfg.Timeout = 300 * time.Millisecond
	tun := testTuning
	tun.bodyBudget = 1 << 20
	tun.retryPause = time.Second // the holder keeps its body through its retries
	p := startProxy(t, cfg, tun)
	c := testClient(t)
	go func() {
		res, err := c.Post(p.url+"/v1/files/holder", "application/octet-stream", bytes.NewReader(make([]byte, 700<<10)))
		if err == nil {
			res.Body.Close()
		}
	}()
	<-entered
	res, err := c.Post(p.url+"/v1/files/second", "application/octet-stream", bytes.NewReader(make([]byte, 600<<10)))
	if err != nil {
		t.Fatal(err)
	}
	e := readError(t, res, http.StatusServiceUnavailable)
	if e.Error.Message != "proxy overloaded: no room to buffer the request body within 300ms, retry later" {
		t.Errorf("message = %q", e.Error.Message)
	}
	if got := res.Header.Get("Retry-After"); got == "" {
		t.Error("no Retry-After on a 503")
	}
	p.logs.waitRequests(t, 1)
	checkMetrics(t, p, map[string]string{
		`proxy_refused_total{reason="body_budget_timeout"}`:    "1",
		`proxy_upstream_errors_total{error_type="overloaded"}`: "1",
	})
}
