package main

import (
	"crypto/x509"
	"debug/buildinfo"
	"debug/elf"
	"encoding/pem"
	"fmt"
	"os"
	"strings"
)

// builtBinary is the reproduced binary, with the CA bundle copied beside it.
type builtBinary struct {
	*elf.File
	path, ca string
	target   target
}

// elfMachine maps GOARCH to the ELF machine the image's binary must carry.
var elfMachine = map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}

// checkBinary checks the reproduced binary and the CA bundle copied beside it.
func checkBinary(r *report, file, ca string, t target) error {
	f, err := elf.Open(file)
	if err != nil {
		return fmt.Errorf("%s is not an ELF executable: %w", file, err)
	}
	defer f.Close()
	runChecks(r, "Binary:", binaryChecks, &builtBinary{f, file, ca, t})
	return nil
}

var binaryChecks = []check[*builtBinary]{
	{"ELF executable for the target platform", func(b *builtBinary) (string, error) {
		linux := b.OSABI == elf.ELFOSABI_NONE || b.OSABI == elf.ELFOSABI_LINUX
		ok := b.Machine == elfMachine[b.target.arch] && linux && b.Type == elf.ET_EXEC
		return b.Machine.String(), require(ok, "machine %v, OS ABI %v, type %v; want %s/%s",
			b.Machine, b.OSABI, b.Type, b.target.os, b.target.arch)
	}},
	{"statically linked: no interpreter, no dynamic section, no shared libraries", func(b *builtBinary) (string, error) {
		for _, p := range b.Progs {
			if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
				return "", fmt.Errorf("program header %v: the binary needs a dynamic loader, which scratch lacks", p.Type)
			}
		}
		libs, _ := b.ImportedLibraries()
		return "", require(len(libs) == 0, "needs %v", libs)
	}},
	{"stripped (-s -w): no symbol table, no DWARF", func(b *builtBinary) (string, error) {
		for _, s := range b.Sections {
			if s.Name == ".symtab" || strings.HasPrefix(s.Name, ".debug_") || strings.HasPrefix(s.Name, ".zdebug_") {
				return "", fmt.Errorf("section %s", s.Name)
			}
		}
		return "", nil
	}},
	// -X main.version is checked by running -version: with -trimpath the go
	// command leaves -ldflags out of the recorded build settings.
	{"build settings: CGO_ENABLED=0, -trimpath, the target's GOOS and GOARCH", func(b *builtBinary) (string, error) {
		bi, err := buildinfo.ReadFile(b.path)
		if err != nil {
			return "", err
		}
		got := map[string]string{}
		for _, s := range bi.Settings {
			got[s.Key] = s.Value
		}
		return fmt.Sprintf("%s, module %s, %s/%s", bi.GoVersion, bi.Main.Path, got["GOOS"], got["GOARCH"]),
			unequal(want{"CGO_ENABLED", got["CGO_ENABLED"], "0"}, want{"-trimpath", got["-trimpath"], "true"},
				want{"GOOS", got["GOOS"], b.target.os}, want{"GOARCH", got["GOARCH"], b.target.arch})
	}},
	{"the CA bundle holds parsable certificates", func(b *builtBinary) (string, error) {
		data, err := os.ReadFile(b.ca)
		n := 0
		for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
			if _, err := x509.ParseCertificate(block.Bytes); err == nil && block.Type == "CERTIFICATE" {
				n++
			}
		}
		return fmt.Sprintf("%d certificates", n),
			require(n > 0, "%s holds no certificate (%v): TLS to the upstream could not verify", b.ca, err)
	}},
}
