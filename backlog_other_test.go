//go:build !linux

package main

import "testing"

// fullBacklogListener needs Linux's accept-queue behaviour; elsewhere the
// connect-timeout test does not run.
func fullBacklogListener(t testing.TB) string {
	t.Skip("a full accept queue drops SYNs only on Linux")
	return ""
}
