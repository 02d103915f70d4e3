package main

import (
	"math"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"sync"
	"sync/atomic"
	"time"
)

// memoryGuard refuses new work when the process's memory nears its limit
// (SPEC: Limits under abuse; Envoy's overload manager acts the same way on
// heap use). Every other limit bounds one kind of load; this one bounds
// them all together, so that whatever mix clients send, the pod is never
// killed for memory: beyond what fits, requests get 503 and Retry-After.
//
// Pressure is the live heap at the last collection plus the runtime's
// memory outside the heap (goroutine stacks above all): what the process
// holds on to, not the garbage GOMEMLIMIT makes the collector clear.
type memoryGuard struct {
	limit   int64 // pressure at which new work is refused; 0: never
	every   time.Duration
	mu      sync.Mutex // held while sampling
	samples [len(pressureMetrics)]rtmetrics.Sample
	next    atomic.Int64 // unix nanoseconds of the next sample
	over    atomic.Bool
	last    atomic.Int64 // the pressure last sampled
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
// new work is refused: three quarters leaves the collector room to keep the
// heap under the limit without running all the time.
const overloadShare = 0.75

// newMemoryGuard returns a guard that refuses work at limit bytes of
// pressure; a limit of 0 takes three quarters of GOMEMLIMIT, and none at
// all if GOMEMLIMIT is not set. It samples at most every 10 ms.
func newMemoryGuard(limit int64) *memoryGuard {
	if limit == 0 {
		if goLimit := debug.SetMemoryLimit(-1); goLimit != math.MaxInt64 {
			limit = int64(float64(goLimit) * overloadShare)
		}
	}
	g := &memoryGuard{limit: limit, every: 10 * time.Millisecond}
	for i, name := range pressureMetrics {
		g.samples[i].Name = name
	}
	return g
}

// overloaded reports whether new work must be refused.
func (g *memoryGuard) overloaded() bool {
	if g.limit == 0 {
		return false
	}
	if now := time.Now().UnixNano(); now >= g.next.Load() && g.mu.TryLock() {
		rtmetrics.Read(g.samples[:])
		v := func(i int) int64 { return int64(g.samples[i].Value.Uint64()) }
		p := v(0) + v(1) - v(2) - v(3) - v(4) - v(5)
		g.last.Store(p)
		g.over.Store(p >= g.limit)
		g.next.Store(now + int64(g.every))
		g.mu.Unlock()
	}
	return g.over.Load()
}
