package main

import "syscall"

// childAttr puts the proxy in its own process group, so that a Ctrl-C
// reaches only the harness, which stops it; and has the kernel kill it if
// the harness dies first, so that no proxy outlives a run.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
