package main

import (
	"math"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync/atomic"
	"time"
)

// memoryGuard keeps the process inside its memory limit whatever clients
// do (SPEC: Limits under abuse), as Envoy's overload manager does: every
// other limit bounds one kind of load, this one bounds them all together.
// While memory is near the limit, new requests get 503 with Retry-After,
// requests waiting for a slot or for body budget are refused the same way,
// and responses whose clients have stopped reading are cut (their buffers
// are the one kind of memory that grows after admission).
//
// Pressure is the live heap at the last collection plus the runtime's
// memory outside the heap (goroutine stacks above all): what the process
// holds on to, not the garbage GOMEMLIMIT makes the collector clear. It is
// sampled every 50 ms by run; overloaded is one atomic load.
type memoryGuard struct {
	limit   atomic.Int64 // pressure at which the guard acts; 0: never
	samples [len(pressureMetrics)]rtmetrics.Sample
	last    atomic.Int64 // the pressure last sampled
	over    atomic.Bool
	// relief is closed when the guard starts acting, so that waiters stop
	// waiting; a new one is made when pressure falls back. Only sample
	// writes it; every waiting request reads it.
	relief atomic.Pointer[chan struct{}]
}

// pressureMetrics are the runtime/metrics read for each sample: the live
// heap, and what is not heap, as total − heap (free, objects, unused,
// released).
var pressureMetrics = [...]string{
	"/gc/heap/live:bytes",
	"/memory/classes/total:bytes",
	"/memory/classes/heap/free:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/heap/released:bytes",
}

// overloadShare is the share of the Go memory limit (GOMEMLIMIT) at which
// the guard acts: three quarters leaves the collector room to keep the
// heap under the limit without running all the time.
const overloadShare = 0.75

// sampleEvery is how often run samples the pressure.
const sampleEvery = 50 * time.Millisecond

// newMemoryGuard returns a guard that acts at limit bytes of pressure; a
// limit of 0 takes three quarters of GOMEMLIMIT, and none at all if
// GOMEMLIMIT is not set. It has sampled once when it is returned.
func newMemoryGuard(limit int64) *memoryGuard {
	if limit == 0 {
		if goLimit := debug.SetMemoryLimit(-1); goLimit != math.MaxInt64 {
			limit = int64(float64(goLimit) * overloadShare)
		}
	}
	g := &memoryGuard{}
	g.limit.Store(limit)
	relief := make(chan struct{})
	g.relief.Store(&relief)
	for i, name := range pressureMetrics {
		g.samples[i].Name = name
	}
	g.sample()
	return g
}

// overloaded reports whether new work must be refused.
func (g *memoryGuard) overloaded() bool { return g.over.Load() }

// waiting returns a channel that is closed once the guard acts: a request
// waiting for something selects on it to give up.
func (g *memoryGuard) waiting() <-chan struct{} { return *g.relief.Load() }

// sample reads the pressure and reports whether the guard turned to
// acting with this sample.
func (g *memoryGuard) sample() (started bool) {
	limit := g.limit.Load()
	if limit == 0 {
		return false
	}
	rtmetrics.Read(g.samples[:])
	v := func(i int) int64 { return int64(g.samples[i].Value.Uint64()) }
	p := v(0) + v(1) - v(2) - v(3) - v(4) - v(5)
	g.last.Store(p)
	over := p >= limit
	if g.over.Swap(over) == over {
		return false
	}
	if over {
		close(*g.relief.Load())
	} else {
		relief := make(chan struct{})
		g.relief.Store(&relief)
	}
	return over
}

// run samples until stop is closed; while the guard acts, it calls shed
// every shedAfter, the first time as soon as it starts acting.
func (g *memoryGuard) run(stop <-chan struct{}, shed func()) {
	if g.limit.Load() == 0 {
		return
	}
	tick := time.NewTicker(sampleEvery)
	defer tick.Stop()
	var lastShed time.Time
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		if started := g.sample(); started || g.overloaded() && time.Since(lastShed) >= shedAfter {
			shed()
			lastShed = time.Now()
		}
	}
}
