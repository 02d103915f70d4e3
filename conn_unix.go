//go:build linux || darwin

package main

import (
	"net"
	"syscall"
)

// peerClosed peeks at c without taking a byte or waiting: a read of 0
// bytes is the peer's FIN, ECONNRESET its reset. Pipelined bytes or
// nothing yet (EAGAIN) mean it is still there. Control, unlike Read, does
// not wait for net/http's own background read of the connection.
func peerClosed(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	closed := false
	rc.Control(func(fd uintptr) {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = n == 0 && err == nil || err == syscall.ECONNRESET
	})
	return closed
}
