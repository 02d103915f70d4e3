package main

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// maxConfigBytes bounds how much loadConfig reads (1 MiB): a real config
// is under 1 KiB, and -config pointed at a device or a big file must fail
// quickly instead of filling memory.
const maxConfigBytes = 1 << 20

// HeaderMode says how a [[headers]] entry changes the outgoing request.
type HeaderMode uint8

const (
	// HeaderSet gives the header exactly the configured value, replacing every
	// value the client sent. It is the default.
	HeaderSet HeaderMode = iota
	// HeaderAppend keeps the client's comma-separated tokens and appends each
	// configured token the client lacks (case-insensitively).
	HeaderAppend
	// HeaderRemove deletes the header from the outgoing request.
	HeaderRemove
)

// headerModeNames is each HeaderMode as written in the config file.
var headerModeNames = [...]string{HeaderSet: "set", HeaderAppend: "append", HeaderRemove: "remove"}

// String returns the mode as written in the config file: "set", "append" or "remove".
func (m HeaderMode) String() string {
	if int(m) < len(headerModeNames) {
		return headerModeNames[m]
	}
	return "HeaderMode(" + strconv.Itoa(int(m)) + ")"
}

// HeaderRule is one [[headers]] entry.
type HeaderRule struct {
	Name  string     // as written in the file (the proxy canonicalises it)
	Value string     // empty for HeaderRemove
	Mode  HeaderMode // HeaderSet when the entry has no mode key
	Line  int        // line of the [[headers]] header, for messages
}

// Config is a loaded and validated configuration. Every field holds a usable
// value: defaults are filled in and the limits of SPEC "Configuration" hold.
type Config struct {
	Path           string        // the file it was read from (as given)
	ListenAddr     string        // host:port with a numeric port; port 0 picks a free one
	Upstream       *url.URL      // parsed upstream_url: http or https, a host, no credentials, query or fragment
	Timeout        time.Duration // timeout_secs: header wait and stream idle timeout
	MaxConnections int           // proxied requests in flight
	MaxBodyBytes   int64         // request body limit
	Headers        []HeaderRule  // in file order, names unique case-insensitively
}

// ConfigError is a problem with a config file, positioned at a line.
type ConfigError struct {
	File string // the path as given
	Line int    // 1-based line; 0 when the problem has no line (a missing key or table)
	Msg  string // lowercase, no trailing period
}

// Error returns "file:line: msg", or "file: msg" when Line is 0.
func (e *ConfigError) Error() string {
	if e.Line == 0 {
		return e.File + ": " + e.Msg
	}
	return e.File + ":" + strconv.Itoa(e.Line) + ": " + e.Msg
}

// loadConfig reads the file at path and returns its parsed and validated
// configuration. Read errors name the path; config errors are *ConfigError.
func loadConfig(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err) // *PathError names the path
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if len(data) > maxConfigBytes {
		return nil, &ConfigError{File: path, Msg: fmt.Sprintf("file is larger than %d bytes (1 MiB), expected a small TOML config; is it the right file?", maxConfigBytes)}
	}
	return parseConfig(path, data)
}

// parseConfig parses data, the contents of file, fills in defaults and
// validates the result. Every error is a *ConfigError naming file.
func parseConfig(file string, data []byte) (*Config, error) {
	p := &parser{file: file}
	if err := p.parse(data); err != nil {
		return nil, err
	}
	cfg, err := p.buildProxy()
	if err != nil {
		return nil, err
	}
	seen := make(map[string]int) // lower-case header name -> line of its name key
	for _, t := range p.headers {
		rule, err := p.buildHeader(t)
		if err != nil {
			return nil, err
		}
		lower, line := strings.ToLower(rule.Name), t.keys["name"].line
		if first, dup := seen[lower]; dup {
			return nil, p.errorAt(line, "duplicate header %s, already configured on line %d (header names are case-insensitive)", quote(rule.Name), first)
		}
		seen[lower] = line
		cfg.Headers = append(cfg.Headers, rule)
	}
	return cfg, nil
}

// table is one [proxy] table or one [[headers]] entry as parsed.
type table struct {
	name string           // "proxy" or "headers"
	line int              // line of the table header
	keys map[string]value // by key
}

// value is one parsed config value.
type value struct {
	str  string // a string after its escapes, or an integer as written
	num  int64  // an integer
	line int    // where it was set, for validation messages
}

// tableKeys are the keys of each table, in the order messages list them.
var tableKeys = map[string][]string{
	"proxy":   {"listen_addr", "upstream_url", "timeout_secs", "max_connections", "max_body_bytes"},
	"headers": {"name", "value", "mode"},
}

// intKeys are the integer keys, all optional, with their defaults and upper
// limits (SPEC "Configuration"); each must be at least 1.
var intKeys = map[string]struct {
	def, max int64
	note     string // what max means, for messages
}{
	// 60 s to wait for the upstream's response headers, and the longest
	// silence allowed inside a streamed body. Over a day is surely a typo,
	// and the cap keeps timeout_secs * time.Second far from overflow.
	"timeout_secs": {60, 86400, " (24 hours)"},
	// Proxied requests in flight; a million is far above what one pod with
	// a 128 MiB memory limit can serve.
	"max_connections": {1000, 1_000_000, ""},
	// The cap is the shared budget for buffered request bodies (SPEC "Memory").
	"max_body_bytes": {10 << 20, 64 << 20, " (64 MiB)"},
}

// parser turns the lines of one config file into tables. It reads each line
// once and keeps no state beyond the tables seen so far.
type parser struct {
	file    string
	line    int      // current line, 1-based
	proxy   *table   // the [proxy] table, nil until seen
	headers []*table // the [[headers]] entries in file order
	cur     *table   // the table keys go to; nil before the first table header
}

// errorAt returns a *ConfigError at line (0: no line).
func (p *parser) errorAt(line int, format string, args ...any) error {
	return &ConfigError{File: p.file, Line: line, Msg: fmt.Sprintf(format, args...)}
}

// parse reads data line by line into p's tables. Each line is blank, a
// comment, a table header or key = value.
func (p *parser) parse(data []byte) error {
	text := string(data)
	// A UTF-16 byte order mark, big- or little-endian, is refused kindly;
	// UTF-8's is skipped (some editors write one).
	if strings.HasPrefix(text, "\xFE\xFF") || strings.HasPrefix(text, "\xFF\xFE") {
		return p.errorAt(1, "file looks like UTF-16 (it starts with a UTF-16 byte order mark), expected UTF-8; save it as UTF-8")
	}
	for line := range strings.SplitSeq(strings.TrimPrefix(text, "\xEF\xBB\xBF"), "\n") {
		p.line++
		sc := &scanner{input: strings.TrimSuffix(line, "\r")} // CRLF line ends
		err := p.checkText(sc.input)
		sc.skipSpace()
		switch r := sc.peek(); {
		case err != nil || r == eof || r == '#': // text refused, or a blank or comment line
		case r == '[':
			err = p.parseTableHeader(sc)
		default:
			err = p.parseKeyValue(sc)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// checkText rejects what a TOML file may not hold anywhere: invalid UTF-8,
// NUL, and control characters other than tab. Columns count characters.
func (p *parser) checkText(line string) error {
	for i, r := range line {
		col := func() int { return utf8.RuneCountInString(line[:i]) + 1 }
		switch {
		case r == utf8.RuneError && !strings.HasPrefix(line[i:], "\uFFFD"):
			return p.errorAt(p.line, "invalid UTF-8 byte 0x%02x at column %d, expected UTF-8 text", line[i], col())
		case r == 0:
			return p.errorAt(p.line, "file contains a NUL byte (column %d); it looks binary or UTF-16, expected UTF-8 text", col())
		case r == '\r':
			return p.errorAt(p.line, "carriage return (U+000D) at column %d is not allowed except before a line feed", col())
		case isControl(r):
			return p.errorAt(p.line, "control character %U at column %d is not allowed (inside a \"...\" string, write it as a \\uXXXX escape)", r, col())
		}
	}
	return nil
}

// isControl reports whether r is a control character other than tab. TOML
// refuses them in the file, and HTTP in a header value.
func isControl(r rune) bool { return (r < 0x20 && r != '\t') || r == 0x7F }

// parseTableHeader reads a [proxy] or [[headers]] line; sc is at the '['.
func (p *parser) parseTableHeader(sc *scanner) error {
	start := sc.pos
	sc.next()
	array := sc.accept("[")
	sc.skipSpace()
	name := sc.acceptRun(bareKeyChars)
	sc.skipSpace()
	closed := sc.accept("]") && (!array || sc.accept("]"))
	switch {
	case name == "tailscale":
		return p.errorAt(p.line, "the [tailscale] section is retired: tailnet exposure is now the Tailscale Operator's job (Service annotations) and the proxy has no tailnet settings; remove the section")
	case !closed || !(name == "proxy" && !array || name == "headers" && array):
		return p.errorAt(p.line, "invalid table header %s, expected [proxy] or [[headers]]", quote(strings.TrimRight(sc.input[start:], " \t")))
	}
	if err := p.endOfLine(sc, "table header "+sc.input[start:sc.pos]); err != nil {
		return err
	}
	t := &table{name: name, line: p.line, keys: make(map[string]value)}
	switch {
	case array:
		p.headers = append(p.headers, t)
	case p.proxy != nil:
		return p.errorAt(p.line, "duplicate table [proxy], first defined on line %d", p.proxy.line)
	default:
		p.proxy = t
	}
	p.cur = t
	return nil
}

// bareKeyChars are the characters of a TOML bare key.
const bareKeyChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"

// parseKeyValue reads a key = value line; sc is at the key.
func (p *parser) parseKeyValue(sc *scanner) error {
	start := sc.pos
	key := sc.acceptRun(bareKeyChars)
	sc.skipSpace()
	switch {
	case key == "":
		return p.errorAt(p.line, "expected a bare key (A-Z a-z 0-9 _ -), [table] or # comment, got %s", quote(sc.rest()))
	case sc.peek() == '.':
		sc.acceptUntil("=")
		return p.errorAt(p.line, "dotted keys are not supported, expected a bare key under its [table], got %s", quote(strings.TrimRight(sc.input[start:sc.pos], " \t")))
	case sc.peek() == eof:
		return p.errorAt(p.line, "expected \"=\" after key %s, got end of line", cut(key, maxShown))
	case !sc.accept("="):
		return p.errorAt(p.line, "expected \"=\" after key %s, got %s", cut(key, maxShown), quote(sc.rest()))
	case p.cur == nil:
		return p.errorAt(p.line, "key %s appears before any table, expected a [proxy] or [[headers]] table header first", cut(key, maxShown))
	}
	name := p.cur.name + "." + key
	if !slices.Contains(tableKeys[p.cur.name], key) {
		hint := "" // a key of the other table
		if slices.Contains(tableKeys["proxy"], key) {
			hint = " (" + key + " belongs under [proxy])"
		} else if slices.Contains(tableKeys["headers"], key) {
			hint = " (" + key + " belongs under [[headers]])"
		}
		return p.errorAt(p.line, "unknown key %s, expected one of %s%s", cut(name, maxShown), strings.Join(tableKeys[p.cur.name], ", "), hint)
	}
	if prev, dup := p.cur.keys[key]; dup {
		return p.errorAt(p.line, "duplicate key %s, first set on line %d", name, prev.line)
	}
	v, err := p.lexValue(sc, name, intKeys[key].max > 0)
	if err != nil {
		return err
	}
	v.line = p.line
	p.cur.keys[key] = v
	return p.endOfLine(sc, "the value of "+name)
}

// endOfLine checks that nothing but spaces and a # comment follows what.
func (p *parser) endOfLine(sc *scanner, what string) error {
	sc.skipSpace()
	if r := sc.peek(); r != eof && r != '#' {
		return p.errorAt(p.line, "trailing garbage after %s, expected end of line or # comment, got %s", what, quote(strings.TrimRight(sc.rest(), " \t")))
	}
	return nil
}

// lexValue reads the value of the key called name, an integer or a
// string; sc is after the '='. Booleans are refused by type; every other
// TOML value (float, date, array, inline table, another base) is unquoted
// text that is no integer, refused with one message.
func (p *parser) lexValue(sc *scanner, name string, integer bool) (value, error) {
	want, hint := "a string", "strings must be quoted"
	if integer {
		want, hint = "an integer", "allowed: decimal digits such as 60 or 1_000, no leading zeros"
	}
	sc.skipSpace()
	rest := sc.rest()
	var got string // what was found instead
	switch r := sc.peek(); {
	case r == eof || r == '#':
		got = "nothing"
	case strings.HasPrefix(rest, `"""`) || strings.HasPrefix(rest, "'''"):
		return value{}, p.errorAt(p.line, "%s: multi-line strings are not supported, expected a single-line \"...\" or '...' string", name)
	case r == '"' || r == '\'':
		s, err := p.lexString(sc, name)
		if err != nil || !integer {
			return value{str: s}, err
		}
		got = "string " + quote(s)
	default:
		tok := sc.acceptUntil(" \t#")
		switch {
		case tok == "true" || tok == "false":
			got = "boolean " + tok
		case !isDecimal(tok):
			got = "unquoted text " + quote(strings.TrimRight(rest, " \t")) + " (" + hint + ")"
		case !integer:
			got = "integer " + cut(tok, maxShown)
		default:
			// Out of the int64 range, ParseInt returns the nearest int64,
			// which every limit refuses, quoting the number as written.
			n, _ := strconv.ParseInt(strings.ReplaceAll(tok, "_", ""), 10, 64)
			return value{str: tok, num: n}, nil
		}
	}
	return value{}, p.errorAt(p.line, "%s must be %s, got %s", name, want, got)
}

// isDecimal reports whether tok is a TOML decimal integer: an optional
// sign, no leading zeros, '_' only between digits.
func isDecimal(tok string) bool {
	sc := &scanner{input: tok}
	sc.accept("+-")
	if sc.accept("0") {
		return sc.peek() == eof
	}
	ok := sc.accept("123456789")
	for ok && sc.peek() != eof {
		sc.accept("_")
		ok = sc.accept("0123456789")
	}
	return ok
}

// lexString reads a "..." string, with its escapes, or a '...' string,
// without; sc is at the opening quote.
func (p *parser) lexString(sc *scanner, name string) (string, error) {
	delim := sc.next()
	var b strings.Builder
	for {
		switch r := sc.next(); {
		case r == eof:
			return "", p.errorAt(p.line, "%s: unterminated string, expected a closing %c before the end of the line", name, delim)
		case r == delim:
			return b.String(), nil
		case r == '\\' && delim == '"':
			if err := p.lexEscape(sc, &b, name); err != nil {
				return "", err
			}
		default:
			b.WriteRune(r)
		}
	}
}

// lexEscape reads the escape after a backslash in a basic string into b.
func (p *parser) lexEscape(sc *scanner, b *strings.Builder, name string) error {
	r := sc.next()
	if i := strings.IndexRune(`"\ntr`, r); i >= 0 {
		b.WriteByte("\"\\\n\t\r"[i]) // the character each escape stands for
		return nil
	}
	switch r {
	case 'u':
		start := sc.pos
		for range 4 {
			sc.accept("0123456789abcdefABCDEF") // once one fails, the rest fail too
		}
		hex := sc.input[start:sc.pos]
		code, _ := strconv.ParseUint(hex, 16, 32)
		if len(hex) < 4 || !utf8.ValidRune(rune(code)) {
			return p.errorAt(p.line, `%s: invalid escape \u%s, expected \u and 4 hex digits of a Unicode character (D800-DFFF are UTF-16 surrogates)`, name, hex)
		}
		b.WriteRune(rune(code))
	case eof: // lexString reports the unterminated string
	default:
		esc := `\` + string(r)
		if !unicode.IsPrint(r) {
			esc = strconv.Quote(esc)
		}
		return p.errorAt(p.line, `%s: invalid escape %s in string, expected one of \" \\ \n \t \r \uXXXX`, name, esc)
	}
	return nil
}

// eof is what scanner.peek and scanner.next return at the end of the line.
const eof = -1

// scanner reads one line rune by rune, in the manner of text/template/parse's
// lexer. The line is valid UTF-8 (checkText ran first).
type scanner struct {
	input string
	pos   int // next byte to read
}

// peek returns the next rune without consuming it, or eof.
func (s *scanner) peek() rune {
	if s.pos >= len(s.input) {
		return eof
	}
	r, _ := utf8.DecodeRuneInString(s.input[s.pos:])
	return r
}

// next consumes and returns the next rune, or eof.
func (s *scanner) next() rune {
	r := s.peek()
	if r != eof {
		s.pos += utf8.RuneLen(r)
	}
	return r
}

// accept consumes the next rune if it is in valid.
func (s *scanner) accept(valid string) bool {
	ok := strings.ContainsRune(valid, s.peek())
	if ok {
		s.next()
	}
	return ok
}

// acceptRun consumes runes while they are in valid, and returns them.
func (s *scanner) acceptRun(valid string) string {
	start := s.pos
	for s.accept(valid) {
	}
	return s.input[start:s.pos]
}

// acceptUntil consumes runes up to the end of the line or the first rune
// in stop, and returns them.
func (s *scanner) acceptUntil(stop string) string {
	start := s.pos
	for r := s.peek(); r != eof && !strings.ContainsRune(stop, r); r = s.peek() {
		s.next()
	}
	return s.input[start:s.pos]
}

// skipSpace consumes spaces and tabs.
func (s *scanner) skipSpace() { s.acceptRun(" \t") }

// rest returns the unread part of the line.
func (s *scanner) rest() string { return s.input[s.pos:] }

// maxShown is the most bytes of the file's text a message repeats (60),
// so that a message stays one short line whatever the input.
const maxShown = 60

// quote returns s for a message: cut to maxShown bytes and quoted.
func quote(s string) string { return strconv.Quote(cut(s, maxShown)) }

// cut shortens s to at most n bytes for a message, on a rune boundary.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// buildProxy returns the config of the [proxy] table, with defaults and checks.
func (p *parser) buildProxy() (*Config, error) {
	t := p.proxy
	if t == nil {
		return nil, p.errorAt(0, "missing [proxy] table, expected [proxy] with listen_addr and upstream_url")
	}
	for _, key := range []string{"listen_addr", "upstream_url"} {
		if _, ok := t.keys[key]; !ok {
			return nil, p.errorAt(0, "proxy.%s is required", key)
		}
	}
	addr, up := t.keys["listen_addr"], t.keys["upstream_url"]
	if !validListenAddr(addr.str) {
		return nil, p.errorAt(addr.line, "proxy.listen_addr must be host:port (host: an IP address, a host name or empty; port: 0 to 65535), such as \"127.0.0.1:8080\", \"[::1]:8080\" or \":8080\", got %s", quote(addr.str))
	}
	u, msg := checkUpstream(up.str)
	if msg != "" {
		return nil, p.errorAt(up.line, "proxy.upstream_url %s", msg)
	}
	for _, key := range tableKeys["proxy"] { // a fixed order: the first error is always the same
		v, ok := t.keys[key]
		lim, integer := intKeys[key]
		switch {
		case !integer:
		case !ok:
			t.keys[key] = value{num: lim.def}
		case v.num < 1 || v.num > lim.max:
			return nil, p.errorAt(v.line, "proxy.%s must be from 1 to %d%s, got %s", key, lim.max, lim.note, cut(v.str, maxShown))
		}
	}
	return &Config{Path: p.file, ListenAddr: addr.str, Upstream: u, Timeout: time.Duration(t.keys["timeout_secs"].num) * time.Second,
		MaxConnections: int(t.keys["max_connections"].num), MaxBodyBytes: t.keys["max_body_bytes"].num}, nil
}

// validListenAddr reports whether addr is host:port with a port in 0..65535
// in decimal digits (no sign, "_" or service name) and a host that is empty,
// an IP address or a host name (letters, digits, '-' and '.', as in DNS).
func validListenAddr(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	_, perr := strconv.ParseUint(port, 10, 16)
	_, herr := netip.ParseAddr(host)
	isName := strings.Trim(host, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.") == "" && strings.Trim(host, ".") != ""
	return err == nil && perr == nil && (herr == nil || host == "" || isName)
}

// checkUpstream parses raw as the upstream URL: http or https, with a host,
// and without credentials, query or fragment, since the client's path and
// query are appended to it. It returns what is wrong, to follow
// "proxy.upstream_url", or "". Messages never show a password.
func checkUpstream(raw string) (*url.URL, string) {
	shown := quote(redactURL(raw))
	u, err := url.Parse(raw)
	if err != nil {
		err = cmp.Or(errors.Unwrap(err), err) // the *url.Error's cause, without the URL
		return nil, fmt.Sprintf("must be a valid URL, got %s (%s)", shown, cut(err.Error(), 2*maxShown))
	}
	// u.Port() is "" both for no port and for an empty one ("host:").
	port := u.Port()
	n, perr := strconv.ParseUint(port, 10, 16)
	switch {
	case u.Scheme == "":
		return nil, fmt.Sprintf("must be an http or https URL such as \"https://api.anthropic.com\", got %s", shown)
	case u.Scheme != "http" && u.Scheme != "https": // shown could hold a password: "user:pass@host" has scheme "user"
		return nil, fmt.Sprintf("must use http or https, got scheme %s", quote(u.Scheme))
	case u.User != nil:
		return nil, fmt.Sprintf("must not contain a user name or password (credentials never belong in the config; clients send their own), got %s", shown)
	case u.Hostname() == "":
		return nil, fmt.Sprintf("must name a host, got %s", shown)
	case u.RawQuery != "" || u.ForceQuery || strings.Contains(raw, "#"):
		return nil, fmt.Sprintf("must not have a query or fragment (the client's path and query are appended to it), got %s", shown)
	case (port != "" || strings.HasSuffix(u.Host, ":")) && (perr != nil || n == 0):
		return nil, fmt.Sprintf("port must be a number from 1 to 65535, got %s", quote(port))
	}
	return u, ""
}

// redactURL replaces the user information of raw, if any, with "REDACTED",
// so that a message never repeats a password.
func redactURL(raw string) string {
	scheme, rest, _ := strings.Cut(raw, "//") // rest is "" when raw has no "//"
	end := strings.IndexAny(rest, "/?#")      // the authority ends at the path, query or fragment
	if end < 0 {
		end = len(rest)
	}
	if at := strings.LastIndex(rest[:end], "@"); at >= 0 {
		return scheme + "//REDACTED" + rest[at:]
	}
	return raw
}

// buildHeader checks one [[headers]] entry and returns its rule: remove
// takes no value; set and append need one that Go's HTTP transport will
// send. Messages never show the value, which may hold a token.
func (p *parser) buildHeader(t *table) (HeaderRule, error) {
	name, hasName := t.keys["name"]
	v, hasValue := t.keys["value"]
	m, hasMode := t.keys["mode"]
	mode := slices.Index(headerModeNames[:], m.str) // -1 when absent or unknown
	rule := HeaderRule{Name: name.str, Value: v.str, Mode: HeaderMode(max(mode, 0)), Line: t.line}
	why := refusedHeaders[strings.ToLower(name.str)]
	if slices.ContainsFunc(hopHeaders[:], func(h string) bool { return strings.EqualFold(h, name.str) }) {
		why = "it is a hop-by-hop header, removed before the request is forwarded"
	}
	ctl := strings.IndexFunc(v.str, isControl) // a control character is one byte
	var err error
	switch {
	case !hasName:
		err = p.errorAt(t.line, "[[headers]] entry has no name, expected name = \"header-name\"")
	case name.str == "" || strings.Trim(name.str, tokenChars) != "":
		err = p.errorAt(name.line, "headers.name must be an HTTP header name (letters, digits and !#$%%&'*+-.^_`|~), got %s", quote(name.str))
	case why != "":
		err = p.errorAt(name.line, "header %s cannot be configured: %s", quote(name.str), why)
	case hasMode && mode < 0:
		err = p.errorAt(m.line, "headers.mode must be one of set, append, remove, got %s", quote(m.str))
	case rule.Mode == HeaderRemove && hasValue:
		err = p.errorAt(v.line, "headers.value must be absent when mode is \"remove\" (header %s is deleted, not given a value)", quote(rule.Name))
	case rule.Mode == HeaderRemove: // no value to check
	case v.str == "": // absent (no line: the entry's) or empty
		err = p.errorAt(cmp.Or(v.line, t.line), "header %s needs a non-empty value = \"...\" for mode %q (use mode = \"remove\" to delete the header)", quote(rule.Name), rule.Mode)
	case rule.Mode == HeaderAppend && strings.Trim(v.str, " \t,") == "":
		err = p.errorAt(v.line, "headers.value must hold at least one token for mode \"append\", got %s", quote(v.str))
	case strings.Trim(v.str, " \t") != v.str:
		// RFC 9110 section 5.5: a field value has no leading or trailing
		// whitespace; the upstream would see a value other than the one written.
		err = p.errorAt(v.line, "headers.value must not begin or end with a space or tab (HTTP strips them)")
	case ctl >= 0:
		err = p.errorAt(v.line, "headers.value must not contain control characters other than tab, got %q at byte %d", rune(v.str[ctl]), ctl)
	}
	return rule, err
}

// tokenChars are the characters of an HTTP token (RFC 9110 section 5.6.2),
// the syntax of a header name.
const tokenChars = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// refusedHeaders says why a header, by lower-case name, can never be
// configured; the hop-by-hop headers (hopHeaders) are refused too.
var refusedHeaders = map[string]string{
	"authorization":  "the client's Authorization always passes through untouched, and the proxy holds no credentials",
	"host":           "Host is always the upstream's host",
	"content-length": "it is set from the request body",
}
