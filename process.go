package main

import (
	"bytes"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"time"
)

// processMetrics are the standard process and Go runtime gauges, under the
// names every Go service's dashboards and alerts already use: resident
// memory (the pod's memory limit is on it), the memory limit the runtime
// works to (GOMEMLIMIT), and the start time, whose changes count restarts.
type processMetrics struct {
	start    time.Time
	rss      func() (int64, bool) // resident memory, if known
	memLimit func() int64         // the runtime's memory limit
}

func newProcessMetrics() processMetrics {
	pm := processMetrics{start: time.Now(), rss: func() (int64, bool) { return 0, false }}
	pm.memLimit = func() int64 { return debug.SetMemoryLimit(-1) }
	if statm := procStatm(); statm != nil {
		pm.rss = func() (int64, bool) { return residentBytes(statm) }
	}
	return pm
}

// procStatm is /proc/self/statm, opened once for the process however many
// metrics read it (tests make many); nil where there is none (darwin).
var procStatm = sync.OnceValue(func() *os.File {
	f, _ := os.Open("/proc/self/statm")
	return f
})

const (
	memLimitName = "go_gc_gomemlimit_bytes"
	memLimitHelp = "Go runtime memory limit (GOMEMLIMIT) in bytes."
	rssName      = "process_resident_memory_bytes"
	rssHelp      = "Resident memory size in bytes."
	startName    = "process_start_time_seconds"
	startHelp    = "Start time of the process since the Unix epoch in seconds."
)

// writeGo appends the go_* family.
func (pm *processMetrics) writeGo(b *bytes.Buffer) {
	writeFamilyHeader(b, memLimitName, memLimitHelp, "gauge")
	writeSample(b, memLimitName, "", "", pm.memLimit())
}

// writeProcess appends the process_* families; resident memory only where
// /proc gives it.
func (pm *processMetrics) writeProcess(b *bytes.Buffer) {
	writeFamilyHeader(b, rssName, rssHelp, "gauge")
	if rss, ok := pm.rss(); ok {
		writeSample(b, rssName, "", "", rss)
	}
	writeFamilyHeader(b, startName, startHelp, "gauge")
	b.WriteString(startName)
	b.WriteByte(' ')
	b.Write(strconv.AppendFloat(b.AvailableBuffer(), float64(pm.start.UnixMilli())/1e3, 'f', -1, 64))
	b.WriteByte('\n')
}

// residentBytes reads the resident set size: the second field of
// /proc/self/statm, in pages.
func residentBytes(statm *os.File) (int64, bool) {
	var buf [128]byte
	n, _ := statm.ReadAt(buf[:], 0)
	field := buf[:n]
	if i := bytes.IndexByte(field, ' '); i >= 0 {
		field = field[i+1:] // past the total size
	}
	var pages int64
	digits := 0
	for _, c := range field {
		if c < '0' || c > '9' {
			break
		}
		pages = pages*10 + int64(c-'0')
		digits++
	}
	return pages * int64(os.Getpagesize()), digits > 0 && digits < 16
}
