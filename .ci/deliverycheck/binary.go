package main

import (
	"crypto/x509"
	"debug/buildinfo"
	"debug/elf"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
)

// elfMachine maps GOARCH to the ELF machine the image's binary must carry.
var elfMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

// checkBinary checks the reproduced binary and the CA bundle copied beside it.
func checkBinary(r *report, file, ca string, t target) {
	fmt.Fprintln(r.w, "Binary:")
	f, err := elf.Open(file)
	if err != nil {
		r.check("the binary is an ELF executable", func() (string, error) { return "", err })
		return
	}
	defer f.Close()
	r.check("ELF executable for "+t.os+"/"+t.arch, func() (string, error) {
		if want, ok := elfMachine[t.arch]; !ok || f.Machine != want || f.OSABI != elf.ELFOSABI_NONE && f.OSABI != elf.ELFOSABI_LINUX || f.Type != elf.ET_EXEC {
			return "", fmt.Errorf("machine %v, OS ABI %v, type %v", f.Machine, f.OSABI, f.Type)
		}
		return f.Machine.String(), nil
	})
	r.check("statically linked: no program interpreter, no dynamic section, no shared libraries", func() (string, error) {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
				return "", fmt.Errorf("program header %v: the binary needs a dynamic loader, which scratch lacks", p.Type)
			}
		}
		if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
			return "", fmt.Errorf("needs %v", libs)
		}
		return "", nil
	})
	r.check("stripped (-s -w): no symbol table, no DWARF", func() (string, error) {
		for _, s := range f.Sections {
			if s.Name == ".symtab" || strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_") {
				return "", fmt.Errorf("section %s", s.Name)
			}
		}
		return "", nil
	})
	// -X main.version is checked by running -version: with -trimpath the go
	// command leaves -ldflags out of the recorded build settings.
	r.check("build settings: CGO_ENABLED=0, -trimpath, "+t.os+"/"+t.arch, func() (string, error) {
		bi, err := buildinfo.ReadFile(file)
		if err != nil {
			return "", err
		}
		got := map[string]string{}
		for _, s := range bi.Settings {
			got[s.Key] = s.Value
		}
		var problems []string
		for _, k := range []string{"CGO_ENABLED", "-trimpath", "GOOS", "GOARCH"} {
			want := map[string]string{"CGO_ENABLED": "0", "-trimpath": "true", "GOOS": t.os, "GOARCH": t.arch}[k]
			if got[k] != want {
				problems = append(problems, fmt.Sprintf("%s=%q, want %q", k, got[k], want))
			}
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		return fmt.Sprintf("%s, module %s", bi.GoVersion, bi.Main.Path), nil
	})
	r.check("the CA bundle holds parsable certificates", func() (string, error) {
		data, err := os.ReadFile(ca)
		if err != nil {
			return "", err
		}
		n := 0
		for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
			if _, err := x509.ParseCertificate(block.Bytes); err == nil && block.Type == "CERTIFICATE" {
				n++
			}
		}
		if n == 0 {
			return "", fmt.Errorf("%s holds no certificate: TLS to the upstream could not verify", ca)
		}
		return fmt.Sprintf("%d certificates", n), nil
	})
}
