package main

import (
	"net/http"
	"strconv"
	"time"
)

// healthHandler serves GET/HEAD /health (router already checked method + path).
// It always answers 200 with Content-Type application/json and exactly
//
//	{"status":"healthy","uptime_seconds":N,"requests_served":N,"errors_total":N}
//
// plus a newline, as encoding/json's Encoder would end it. uptime_seconds is
// the whole seconds since start; requests_served and errors_total come from m
// (SPEC "Endpoints"). HEAD gets the same headers and no body.
func healthHandler(m *metrics, start time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uptime := max(time.Since(start), 0) / time.Second

		var buf [160]byte // 74 bytes of text plus three numbers of at most 20 digits
		b := append(buf[:0], `{"status":"healthy","uptime_seconds":`...)
		b = strconv.AppendInt(b, int64(uptime), 10)
		b = append(b, `,"requests_served":`...)
		b = strconv.AppendUint(b, m.requestsServed(), 10)
		b = append(b, `,"errors_total":`...)
		b = strconv.AppendUint(b, m.errorsTotal(), 10)
		b = append(b, "}\n"...)

		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			// An error means the prober left; there is nobody to tell.
			w.Write(b)
		}
	})
}
