package main

import (
	"fmt"
	"regexp"
	"strconv"
)

// quantityRE matches a Kubernetes resource quantity: a decimal number, then an
// optional exponent or suffix (binary Ki..Ei, decimal n u m k M G T P E).
var quantityRE = regexp.MustCompile(`^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$`)

var quantitySuffix = map[string]float64{
	"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
	"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60,
}

// parseQuantity returns the value of a Kubernetes quantity in base units
// (bytes for memory, cores for CPU).
func parseQuantity(s string) (float64, error) {
	m := quantityRE.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("%q is not a Kubernetes quantity", s)
	}
	v, err := strconv.ParseFloat(m[1]+m[2], 64)
	if err != nil {
		return 0, fmt.Errorf("%q: %v", s, err)
	}
	return v * quantitySuffix[m[3]], nil
}

// goMemLimitRE matches GOMEMLIMIT as the Go runtime reads it: an integer
// number of bytes with an optional B, KiB, MiB, GiB or TiB suffix.
var goMemLimitRE = regexp.MustCompile(`^([0-9]+)(B|KiB|MiB|GiB|TiB)?$`)

// parseGoMemLimit returns GOMEMLIMIT in bytes.
func parseGoMemLimit(s string) (int64, error) {
	m := goMemLimitRE.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("GOMEMLIMIT %q is not a byte count the Go runtime accepts (like 110MiB)", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("GOMEMLIMIT %q: %v", s, err)
	}
	shift := map[string]uint{"": 0, "B": 0, "KiB": 10, "MiB": 20, "GiB": 30, "TiB": 40}[m[2]]
	if n > (1<<63-1)>>shift {
		return 0, fmt.Errorf("GOMEMLIMIT %q overflows", s)
	}
	return n << shift, nil
}
