//go:build !linux

package main

import "syscall"

// childAttr puts the proxy in its own process group, so that a Ctrl-C
// reaches only the harness, which stops it. (The harness reads
// /proc/PID/status, so it measures nothing outside Linux; this file only
// keeps the module building everywhere.)
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
