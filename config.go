package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits and defaults of the [proxy] table (SPEC "Configuration").
const (
	// defaultTimeoutSecs is timeout_secs when the key is absent: 60 s to wait
	// for the upstream's response headers, and the longest silence allowed
	// inside a streamed body.
	defaultTimeoutSecs = 60
	// maxTimeoutSecs caps timeout_secs at one day (86400 s): longer is surely
	// a typo, and the cap keeps timeout_secs * time.Second far from overflow.
	maxTimeoutSecs = 86400
	// defaultMaxConnections is max_connections when the key is absent: 1000
	// proxied requests in flight.
	defaultMaxConnections = 1000
	// maxMaxConnections caps max_connections at one million, far above what
	// one pod with a 128 MiB memory limit can serve.
	maxMaxConnections = 1_000_000
	// defaultMaxBodyBytes is max_body_bytes when the key is absent: 10 MiB.
	defaultMaxBodyBytes = 10 << 20
	// maxMaxBodyBytes caps max_body_bytes at 64 MiB, the shared budget for
	// buffered request bodies (SPEC "Memory").
	maxMaxBodyBytes = 64 << 20
	// maxConfigBytes bounds how much loadConfig reads (1 MiB): a real config
	// is under 1 KiB, and -config pointed at a device or a big file must fail
	// quickly instead of filling memory.
	maxConfigBytes = 1 << 20
)

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

// parseHeaderMode returns the mode spelled s, and false when s is no mode.
func parseHeaderMode(s string) (HeaderMode, bool) {
	for m, name := range headerModeNames {
		if s == name {
			return HeaderMode(m), true
		}
	}
	return 0, false
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
		return nil, &ConfigError{File: path, Msg: fmt.Sprintf(
			"file is larger than %d bytes (1 MiB), expected a small TOML config; is it the right file?", maxConfigBytes)}
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
	cfg := &Config{Path: file}
	if err := p.buildProxy(cfg); err != nil {
		return nil, err
	}
	if err := p.buildHeaders(cfg); err != nil {
		return nil, err
	}
	return cfg, nil
}

// valueKind is the type of a config value.
type valueKind uint8

const (
	kindString  valueKind = iota // "..." or '...'
	kindInteger                  // decimal, with optional _ separators
	kindBoolean                  // true or false
)

// String returns the kind with its article, as messages use it: "a string".
func (k valueKind) String() string {
	switch k {
	case kindString:
		return "a string"
	case kindInteger:
		return "an integer"
	}
	return "a boolean"
}

// value is one parsed config value.
type value struct {
	kind valueKind
	str  string // kindString: the string after escapes
	num  int64  // kindInteger
	text string // kindInteger and kindBoolean: the value as written
}

// describe says what v is, for "must be X, got Y" messages.
func (v value) describe() string {
	switch v.kind {
	case kindString:
		return "string " + quote(v.str)
	case kindInteger:
		return "integer " + v.text
	}
	return "boolean " + v.text
}

// entry is one key = value assignment, with its line for validation messages.
type entry struct {
	value
	line int
}

// table is one [proxy] table or one [[headers]] entry as parsed.
type table struct {
	name string           // "proxy" or "headers"
	line int              // line of the table header
	keys map[string]entry // by key
}

// keySpec is one key a table accepts.
type keySpec struct {
	name string
	kind valueKind
}

// proxyKeys are the keys of [proxy], in the order messages list them.
var proxyKeys = []keySpec{
	{"listen_addr", kindString},
	{"upstream_url", kindString},
	{"timeout_secs", kindInteger},
	{"max_connections", kindInteger},
	{"max_body_bytes", kindInteger},
}

// headerKeys are the keys of a [[headers]] entry, in the order messages list them.
var headerKeys = []keySpec{
	{"name", kindString},
	{"value", kindString},
	{"mode", kindString},
}

// tableKeys returns the keys table accepts.
func tableKeys(table string) []keySpec {
	if table == "proxy" {
		return proxyKeys
	}
	return headerKeys
}

// lookupKey returns the kind of key in table, and false when table has no such key.
func lookupKey(table, key string) (valueKind, bool) {
	for _, k := range tableKeys(table) {
		if k.name == key {
			return k.kind, true
		}
	}
	return 0, false
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

// errorf returns a *ConfigError at the current line.
func (p *parser) errorf(format string, args ...any) error {
	return p.errorAt(p.line, format, args...)
}

// errorAt returns a *ConfigError at line (0: no line).
func (p *parser) errorAt(line int, format string, args ...any) error {
	return &ConfigError{File: p.file, Line: line, Msg: fmt.Sprintf(format, args...)}
}

// Byte order marks: UTF-8's is accepted at the start of the file (some
// editors write one); UTF-16's, big- and little-endian, are refused kindly.
const (
	utf8BOM    = "\xEF\xBB\xBF"
	utf16BEBOM = "\xFE\xFF"
	utf16LEBOM = "\xFF\xFE"
)

// parse reads data line by line into p's tables.
func (p *parser) parse(data []byte) error {
	text := string(data)
	if strings.HasPrefix(text, utf16BEBOM) || strings.HasPrefix(text, utf16LEBOM) {
		p.line = 1
		return p.errorf("file looks like UTF-16 (it starts with a UTF-16 byte order mark), expected UTF-8; save it as UTF-8")
	}
	text = strings.TrimPrefix(text, utf8BOM)
	for line := range strings.SplitSeq(text, "\n") {
		p.line++
		if err := p.parseLine(line); err != nil {
			return err
		}
	}
	return nil
}

// parseLine handles one line: blank, comment, table header or key = value.
func (p *parser) parseLine(line string) error {
	line = strings.TrimSuffix(line, "\r") // CRLF line ends
	if err := p.checkText(line); err != nil {
		return err
	}
	s := strings.TrimLeft(line, " \t")
	switch {
	case s == "" || s[0] == '#':
		return nil
	case s[0] == '[':
		return p.parseTableHeader(s)
	}
	return p.parseKeyValue(s)
}

// checkText rejects bytes a TOML file may not hold anywhere: invalid UTF-8,
// NUL, and control characters other than tab. Columns count characters.
func (p *parser) checkText(line string) error {
	for i, r := range line {
		switch {
		case r == utf8.RuneError && !strings.HasPrefix(line[i:], "\uFFFD"):
			return p.errorf("invalid UTF-8 byte 0x%02x at column %d, expected UTF-8 text", line[i], column(line, i))
		case r == 0:
			return p.errorf("file contains a NUL byte (column %d); it looks binary or UTF-16, expected UTF-8 text", column(line, i))
		case r == '\r':
			return p.errorf("carriage return (U+000D) at column %d is not allowed except before a line feed", column(line, i))
		case (r < 0x20 && r != '\t') || r == 0x7F:
			return p.errorf("control character %U at column %d is not allowed (inside a \"...\" string, write it as a \\uXXXX escape)", r, column(line, i))
		}
	}
	return nil
}

// column returns the 1-based column, in characters, of byte i of line.
func column(line string, i int) int { return utf8.RuneCountInString(line[:i]) + 1 }

// parseTableHeader handles a line starting with '[': [table] or [[array-of-tables]].
func (p *parser) parseTableHeader(s string) error {
	array := strings.HasPrefix(s, "[[")
	open, closing := "[", "]"
	if array {
		open, closing = "[[", "]]"
	}
	body := s[len(open):]
	end := strings.Index(body, closing)
	if end < 0 {
		return p.errorf("unterminated table header %s, expected %q", quote(s), closing)
	}
	name := strings.Trim(body[:end], " \t")
	written := shown(open + name + closing) // cut and quoted when needed
	if err := p.checkTableName(name, written, array); err != nil {
		return err
	}
	if rest := trimComment(body[end+len(closing):]); rest != "" {
		return p.errorf("trailing garbage after table header %s, expected end of line or # comment, got %s", written, quote(rest))
	}
	return p.openTable(name)
}

// trimComment returns s without surrounding whitespace, or "" when what is
// left is a # comment.
func trimComment(s string) string {
	s = strings.Trim(s, " \t")
	if strings.HasPrefix(s, "#") {
		return ""
	}
	return s
}

// checkTableName accepts exactly [proxy] and [[headers]], with a message
// for each way of getting it wrong.
func (p *parser) checkTableName(name, written string, array bool) error {
	switch {
	case name == "":
		return p.errorf("empty table name %s, expected [proxy] or [[headers]]", written)
	case strings.ContainsAny(name, `"'`):
		return p.errorf("quoted table names are not supported, expected [proxy] or [[headers]], got %s", written)
	case strings.Trim(strings.SplitN(name, ".", 2)[0], " \t") == "tailscale":
		return p.errorf("the %s section is retired: tailnet exposure is now the Tailscale Operator's job (Service annotations) and the proxy has no tailnet settings; remove the section", written)
	case strings.Contains(name, "."):
		return p.errorf("dotted table names are not supported, expected [proxy] or [[headers]], got %s", written)
	case !isBareKey(name):
		return p.errorf("invalid table name %s, expected [proxy] or [[headers]]", quote(name))
	case name == "proxy" && array:
		return p.errorf("proxy is a single table, expected [proxy], got %s", written)
	case name == "headers" && !array:
		return p.errorf("headers is an array of tables, expected [[headers]] (one per header), got %s", written)
	case name != "proxy" && name != "headers":
		return p.errorf("unknown table %s, expected [proxy] or [[headers]]", written)
	}
	return nil
}

// openTable starts the table name, which checkTableName accepted.
func (p *parser) openTable(name string) error {
	t := &table{name: name, line: p.line, keys: make(map[string]entry)}
	if name == "proxy" {
		if p.proxy != nil {
			return p.errorf("duplicate table [proxy], first defined on line %d", p.proxy.line)
		}
		p.proxy = t
	} else {
		p.headers = append(p.headers, t)
	}
	p.cur = t
	return nil
}

// isBareKey reports whether s is a non-empty TOML bare key: A-Z a-z 0-9 _ -.
func isBareKey(s string) bool {
	return s != "" && strings.Trim(s, bareKeyChars) == ""
}

// bareKeyChars are the characters of a TOML bare key.
const bareKeyChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"

// parseKeyValue handles a key = value line, s without leading whitespace.
func (p *parser) parseKeyValue(s string) error {
	key, rest, err := p.splitKey(s)
	if err != nil {
		return err
	}
	if p.cur == nil {
		return p.errorf("key %s appears before any table, expected %s", cut(key, maxShown), homeOf(key))
	}
	name := p.cur.name + "." + key
	kind, ok := lookupKey(p.cur.name, key)
	if !ok {
		return p.unknownKey(name, key)
	}
	if prev, dup := p.cur.keys[key]; dup {
		return p.errorf("duplicate key %s, first set on line %d", name, prev.line)
	}
	v, rest, err := p.lexValue(rest, name, kind)
	if err != nil {
		return err
	}
	if rest = trimComment(rest); rest != "" {
		return p.errorf("trailing garbage after the value of %s, expected end of line or # comment, got %s", name, quote(rest))
	}
	if v.kind != kind {
		return p.errorf("%s must be %v, got %s", name, kind, v.describe())
	}
	p.cur.keys[key] = entry{value: v, line: p.line}
	return nil
}

// homeOf says where a key found before any table header belongs.
func homeOf(key string) string {
	if _, ok := lookupKey("proxy", key); ok {
		return "it under [proxy]"
	}
	if _, ok := lookupKey("headers", key); ok {
		return "it under [[headers]]"
	}
	return "a [proxy] or [[headers]] table header first"
}

// unknownKey returns the error for key, which the current table lacks,
// listing the keys it has.
func (p *parser) unknownKey(name, key string) error {
	var names []string
	for _, k := range tableKeys(p.cur.name) {
		names = append(names, k.name)
	}
	hint := ""
	if _, ok := lookupKey("proxy", key); ok && p.cur.name == "headers" {
		hint = " (" + key + " belongs under [proxy])"
	} else if _, ok := lookupKey("headers", key); ok && p.cur.name == "proxy" {
		hint = " (" + key + " belongs under [[headers]])"
	}
	return p.errorf("unknown key %s, expected one of %s%s", cut(name, maxShown), strings.Join(names, ", "), hint)
}

// splitKey reads the bare key at the start of s and the '=' after it, and
// returns the key and the text after '='.
func (p *parser) splitKey(s string) (key, rest string, err error) {
	if s[0] == '"' || s[0] == '\'' {
		quoted, _, _ := strings.Cut(s[1:], s[:1])
		return "", "", p.errorf("quoted keys are not supported, expected a bare key (A-Z a-z 0-9 _ -), got quoted key %s", quote(quoted))
	}
	sc := &scanner{input: s}
	sc.acceptRun(bareKeyChars)
	key = s[:sc.pos]
	sc.skipSpace()
	switch {
	case key == "" && sc.peek() == '=':
		return "", "", p.errorf("expected a bare key before \"=\", got nothing")
	case key == "":
		return "", "", p.errorf("expected a key, [table] or # comment, got %s", quote(s))
	case sc.peek() == '.':
		dotted, _, _ := strings.Cut(s, "=")
		return "", "", p.errorf("dotted keys are not supported, expected a bare key under its [table], got %s", quote(strings.Trim(dotted, " \t")))
	case sc.peek() == eof:
		return "", "", p.errorf("expected \"=\" after key %s, got end of line", cut(key, maxShown))
	case sc.next() != '=':
		return "", "", p.errorf("expected \"=\" after key %s, got %s", cut(key, maxShown), quote(s[sc.pos-sc.width:]))
	}
	return key, s[sc.pos:], nil
}

// maxShown is the most bytes of the file's text a message repeats (60),
// so that a message stays one short line whatever the input.
const maxShown = 60

// quote returns s for a message: cut to maxShown bytes and quoted.
func quote(s string) string { return strconv.Quote(cut(s, maxShown)) }

// shown returns s for a message: cut to maxShown bytes, and quoted unless
// every character is printable.
func shown(s string) string {
	s = cut(s, maxShown)
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return strconv.Quote(s)
	}
	return s
}

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

// lexValue reads the value at the start of s (after optional whitespace)
// for the key called name, which wants a value of kind want. It returns the
// value and the text after it.
func (p *parser) lexValue(s, name string, want valueKind) (value, string, error) {
	s = strings.TrimLeft(s, " \t")
	unsupported := func(what, note string) error {
		return p.errorf("%s must be %v, got %s %s (%s)", name, want, what, quote(s), note)
	}
	switch {
	case s == "" || s[0] == '#':
		return value{}, "", p.errorf("%s must be %v, got nothing", name, want)
	case strings.HasPrefix(s, `"""`) || strings.HasPrefix(s, "'''"):
		return value{}, "", p.errorf("%s: multi-line strings are not supported, expected a single-line \"...\" or '...' string", name)
	case s[0] == '"':
		return p.lexBasicString(s, name)
	case s[0] == '\'':
		return p.lexLiteralString(s, name)
	case s[0] == '[':
		return value{}, "", unsupported("array", "arrays are not supported")
	case s[0] == '{':
		return value{}, "", unsupported("inline table", "inline tables are not supported")
	}
	end := strings.IndexAny(s, " \t#")
	if end < 0 {
		end = len(s)
	}
	v, err := p.lexBare(s[:end], name, want)
	return v, s[end:], err
}

// lexBare reads tok, an unquoted value: a boolean or a decimal integer, or
// one of the TOML forms this subset refuses (floats, dates, other bases).
func (p *parser) lexBare(tok, name string, want valueKind) (value, error) {
	if tok == "true" || tok == "false" {
		return value{kind: kindBoolean, text: tok}, nil
	}
	unsigned := tok
	if tok[0] == '+' || tok[0] == '-' {
		unsigned = tok[1:]
	}
	unsupported := func(what, note string) (value, error) {
		return value{}, p.errorf("%s must be %v, got %s %s (%s)", name, want, what, shown(tok), note)
	}
	switch {
	case unsigned == "inf" || unsigned == "nan":
		return unsupported("float", "floats are not supported")
	case unsigned == "" || !isDigit(unsigned[0]):
		return value{}, p.unquoted(tok, name, want)
	case isDateTime(tok):
		return unsupported("date-time", "dates and times are not supported")
	case strings.HasPrefix(tok, "0x"):
		return unsupported("hexadecimal integer", "only decimal integers are supported")
	case strings.HasPrefix(tok, "0o"):
		return unsupported("octal integer", "only decimal integers are supported")
	case strings.HasPrefix(tok, "0b"):
		return unsupported("binary integer", "only decimal integers are supported")
	case isFloat(unsigned):
		return unsupported("float", "floats are not supported")
	}
	n, problem, ok := parseDecimal(tok)
	switch {
	case !ok:
		return value{}, p.unquoted(tok, name, want)
	case want != kindInteger:
		return value{}, p.errorf("%s must be %v, got integer %s", name, want, shown(tok))
	case problem != "":
		return value{}, p.errorf("%s must be a decimal integer, got %s (%s)", name, shown(tok), problem)
	}
	return value{kind: kindInteger, num: n, text: tok}, nil
}

// unquoted returns the error for tok, unquoted text that is no TOML value.
func (p *parser) unquoted(tok, name string, want valueKind) error {
	hint := ""
	if want == kindString {
		hint = " (strings must be quoted)"
	}
	return p.errorf("%s must be %v, got unquoted text %s%s", name, want, quote(tok), hint)
}

// isDigit reports whether c is an ASCII digit.
func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// isDateTime reports whether tok starts like a TOML date (1979-05-27) or
// time (07:32:00).
func isDateTime(tok string) bool {
	digitsAt := func(s string, idx ...int) bool {
		for _, i := range idx {
			if i >= len(s) || !isDigit(s[i]) {
				return false
			}
		}
		return true
	}
	date := len(tok) >= 10 && tok[4] == '-' && tok[7] == '-' && digitsAt(tok, 0, 1, 2, 3, 5, 6, 8, 9)
	clock := len(tok) >= 8 && tok[2] == ':' && tok[5] == ':' && digitsAt(tok, 0, 1, 3, 4, 6, 7)
	return date || clock
}

// isFloat reports whether s (without sign) has the shape of a TOML float:
// digits with a fraction, an exponent or both (1.5, 1e3, 6.02e+23).
func isFloat(s string) bool {
	mantissa, exp, hasExp := strings.Cut(strings.ToLower(s), "e")
	whole, frac, hasFrac := strings.Cut(mantissa, ".")
	if hasExp {
		exp = strings.TrimLeft(exp, "+-")
	}
	digits := func(t string) bool { return t != "" && strings.Trim(t, "0123456789_") == "" }
	return (hasExp || hasFrac) && digits(whole) && (!hasFrac || digits(frac)) && (!hasExp || digits(exp))
}

// parseDecimal parses tok as a TOML decimal integer: an optional sign, no
// leading zeros, '_' only between digits. ok is false when tok is not made
// of a sign, digits and underscores at all; problem says why an integer-like
// tok is still invalid.
func parseDecimal(tok string) (n int64, problem string, ok bool) {
	sign, digits := "", tok
	if tok[0] == '+' || tok[0] == '-' {
		sign, digits = tok[:1], tok[1:]
	}
	if digits == "" || strings.Trim(digits, "0123456789_") != "" {
		return 0, "", false
	}
	if digits[0] == '_' || digits[len(digits)-1] == '_' || strings.Contains(digits, "__") {
		return 0, "underscores are allowed only between digits", true
	}
	plain := strings.ReplaceAll(digits, "_", "")
	if len(plain) > 1 && plain[0] == '0' {
		return 0, "leading zeros are not allowed", true
	}
	n, err := strconv.ParseInt(sign+plain, 10, 64)
	if err != nil {
		return 0, "out of the 64-bit integer range", true
	}
	return n, "", true
}

// lexBasicString reads the "..." string at the start of s, with its escapes.
func (p *parser) lexBasicString(s, name string) (value, string, error) {
	sc := &scanner{input: s}
	sc.next() // the opening quote
	var b strings.Builder
	for {
		switch r := sc.next(); r {
		case eof:
			return value{}, "", p.errorf("%s: unterminated string, expected a closing \" before the end of the line", name)
		case '"':
			return value{kind: kindString, str: b.String()}, sc.rest(), nil
		case '\\':
			if err := p.lexEscape(sc, &b, name); err != nil {
				return value{}, "", err
			}
		default:
			b.WriteRune(r)
		}
	}
}

// lexEscape reads the escape after a backslash in a basic string into b.
func (p *parser) lexEscape(sc *scanner, b *strings.Builder, name string) error {
	switch r := sc.next(); r {
	case '"', '\\':
		b.WriteRune(r)
	case 'n':
		b.WriteByte('\n')
	case 't':
		b.WriteByte('\t')
	case 'r':
		b.WriteByte('\r')
	case 'u':
		return p.lexUnicodeEscape(sc, b, name)
	case eof:
		return p.errorf("%s: unterminated string, expected a closing \" before the end of the line", name)
	default:
		return p.errorf(`%s: invalid escape %s in string, expected one of \" \\ \n \t \r \uXXXX`, name, shown(`\`+string(r)))
	}
	return nil
}

// lexUnicodeEscape reads the four hex digits of a \uXXXX escape into b.
func (p *parser) lexUnicodeEscape(sc *scanner, b *strings.Builder, name string) error {
	start := sc.pos
	for range 4 {
		if !sc.accept("0123456789abcdefABCDEF") {
			return p.errorf(`%s: invalid escape \u%s, expected \u followed by 4 hex digits`, name, sc.input[start:sc.pos])
		}
	}
	hex := sc.input[start:sc.pos]
	code, _ := strconv.ParseUint(hex, 16, 32) // four hex digits always parse
	r := rune(code)
	if !utf8.ValidRune(r) {
		return p.errorf(`%s: invalid escape \u%s, expected a Unicode character (D800-DFFF are UTF-16 surrogates)`, name, hex)
	}
	b.WriteRune(r)
	return nil
}

// lexLiteralString reads the '...' string at the start of s: no escapes.
func (p *parser) lexLiteralString(s, name string) (value, string, error) {
	end := strings.IndexByte(s[1:], '\'')
	if end < 0 {
		return value{}, "", p.errorf("%s: unterminated string, expected a closing ' before the end of the line", name)
	}
	return value{kind: kindString, str: s[1 : 1+end]}, s[2+end:], nil
}

// eof is what scanner.next returns at the end of the line.
const eof = -1

// scanner reads one line rune by rune, in the manner of text/template/parse's
// lexer. The line is valid UTF-8 (checkText ran first).
type scanner struct {
	input string
	pos   int // next byte to read
	width int // width of the last rune read, for backup
}

// next returns the next rune, or eof.
func (s *scanner) next() rune {
	if s.pos >= len(s.input) {
		s.width = 0
		return eof
	}
	r, w := utf8.DecodeRuneInString(s.input[s.pos:])
	s.pos += w
	s.width = w
	return r
}

// backup steps back over the rune next returned; call it once per next.
func (s *scanner) backup() { s.pos -= s.width }

// peek returns the next rune without consuming it.
func (s *scanner) peek() rune {
	r := s.next()
	s.backup()
	return r
}

// accept consumes the next rune if it is in valid.
func (s *scanner) accept(valid string) bool {
	if strings.ContainsRune(valid, s.next()) {
		return true
	}
	s.backup()
	return false
}

// acceptRun consumes runes while they are in valid.
func (s *scanner) acceptRun(valid string) {
	for s.accept(valid) {
	}
}

// skipSpace consumes spaces and tabs.
func (s *scanner) skipSpace() { s.acceptRun(" \t") }

// rest returns the unread part of the line.
func (s *scanner) rest() string { return s.input[s.pos:] }

// buildProxy fills cfg from the [proxy] table, applying defaults and checks.
func (p *parser) buildProxy(cfg *Config) error {
	t := p.proxy
	if t == nil {
		return p.errorAt(0, "missing [proxy] table, expected [proxy] with listen_addr and upstream_url")
	}
	for _, key := range []string{"listen_addr", "upstream_url"} {
		if _, ok := t.keys[key]; !ok {
			return p.errorAt(0, "proxy.%s is required", key)
		}
	}
	addr := t.keys["listen_addr"]
	if msg := checkListenAddr(addr.str); msg != "" {
		return p.errorAt(addr.line, "proxy.listen_addr %s", msg)
	}
	cfg.ListenAddr = addr.str
	up := t.keys["upstream_url"]
	u, msg := checkUpstream(up.str)
	if msg != "" {
		return p.errorAt(up.line, "proxy.upstream_url %s", msg)
	}
	cfg.Upstream = u
	secs, err := p.intKey(t, "timeout_secs", defaultTimeoutSecs, maxTimeoutSecs, " (24 hours)")
	if err != nil {
		return err
	}
	cfg.Timeout = time.Duration(secs) * time.Second
	conns, err := p.intKey(t, "max_connections", defaultMaxConnections, maxMaxConnections, "")
	if err != nil {
		return err
	}
	cfg.MaxConnections = int(conns)
	cfg.MaxBodyBytes, err = p.intKey(t, "max_body_bytes", defaultMaxBodyBytes, maxMaxBodyBytes, " (64 MiB)")
	return err
}

// intKey returns the integer key of t, def when absent, checking that it is
// in 1..limit; note explains limit in the message.
func (p *parser) intKey(t *table, key string, def, limit int64, note string) (int64, error) {
	e, ok := t.keys[key]
	switch {
	case !ok:
		return def, nil
	case e.num <= 0:
		return 0, p.errorAt(e.line, "%s.%s must be greater than 0, got %s", t.name, key, e.text)
	case e.num > limit:
		return 0, p.errorAt(e.line, "%s.%s must be at most %d%s, got %s", t.name, key, limit, note, e.text)
	}
	return e.num, nil
}

// checkListenAddr checks addr is host:port with a numeric port in 0..65535
// and a host that is empty, an IP address or a host name. It returns what
// is wrong, to follow "proxy.listen_addr", or "".
func checkListenAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		var ae *net.AddrError
		if errors.As(err, &ae) {
			err = errors.New(ae.Err)
		}
		return fmt.Sprintf("must be host:port such as \"127.0.0.1:8080\", got %s (%v)", quote(addr), err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil { // no sign, no "_", no service names
		return fmt.Sprintf("port must be a number from 0 to 65535, got %s", quote(port))
	}
	if _, err := netip.ParseAddr(host); err != nil && host != "" && !isHostName(host) {
		return fmt.Sprintf("host must be an IP address or a host name, got %s", quote(host))
	}
	return ""
}

// isHostName reports whether s is made of the characters of a DNS name
// (letters, digits, '-', '.'), which is all a listen address needs.
func isHostName(s string) bool {
	return strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.") == "" &&
		strings.Trim(s, ".") != ""
}

// checkUpstream parses raw as the upstream URL: http or https, with a host,
// and without credentials, query or fragment, since the client's path and
// query are appended to it. It returns what is wrong, to follow
// "proxy.upstream_url", or "". Messages never show a password.
func checkUpstream(raw string) (*url.URL, string) {
	shown := quote(redactURL(raw))
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Sprintf("must be a valid URL, got %s (%s)", shown, cut(err.Error(), 2*maxShown))
	}
	switch {
	case u.Scheme == "":
		return nil, fmt.Sprintf("must be an http or https URL such as \"https://api.anthropic.com\", got %s", shown)
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Sprintf("must use http or https, got scheme %s", quote(u.Scheme))
	case u.User != nil:
		return nil, fmt.Sprintf("must not contain a user name or password (credentials never belong in the config; clients send their own), got %s", shown)
	case u.Hostname() == "":
		return nil, fmt.Sprintf("must name a host, got %s", shown)
	case u.RawQuery != "" || u.ForceQuery:
		return nil, fmt.Sprintf("must not have a query (the client's query is sent), got %s", shown)
	case strings.Contains(raw, "#"):
		return nil, fmt.Sprintf("must not have a fragment (#...), got %s", shown)
	}
	// u.Port() is "" both for no port and for an empty one ("host:").
	if port := u.Port(); port != "" || strings.HasSuffix(u.Host, ":") {
		if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
			return nil, fmt.Sprintf("port must be a number from 1 to 65535, got %s", quote(port))
		}
	}
	return u, ""
}

// redactURL replaces the user information of raw, if any, with "REDACTED",
// so that a message never repeats a password.
func redactURL(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "//")
	if !ok {
		return raw
	}
	authority := rest
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority = rest[:i]
	}
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return raw
	}
	return scheme + "//REDACTED" + rest[at:]
}

// buildHeaders fills cfg.Headers from the [[headers]] entries, in file
// order, refusing two entries for the same header.
func (p *parser) buildHeaders(cfg *Config) error {
	seen := make(map[string]int) // lower-case name -> line of its name key
	for _, t := range p.headers {
		rule, err := p.buildHeader(t)
		if err != nil {
			return err
		}
		lower := strings.ToLower(rule.Name)
		line := t.keys["name"].line
		if first, dup := seen[lower]; dup {
			return p.errorAt(line, "duplicate header %s, already configured on line %d (header names are case-insensitive)", quote(rule.Name), first)
		}
		seen[lower] = line
		cfg.Headers = append(cfg.Headers, rule)
	}
	return nil
}

// buildHeader checks one [[headers]] entry and returns its rule.
func (p *parser) buildHeader(t *table) (HeaderRule, error) {
	name, ok := t.keys["name"]
	if !ok {
		return HeaderRule{}, p.errorAt(t.line, "[[headers]] entry has no name, expected name = \"header-name\"")
	}
	if !isToken(name.str) {
		return HeaderRule{}, p.errorAt(name.line, "headers.name must be an HTTP header name (letters, digits and !#$%%&'*+-.^_`|~), got %s", quote(name.str))
	}
	if why := refusedHeader(strings.ToLower(name.str)); why != "" {
		return HeaderRule{}, p.errorAt(name.line, "header %s cannot be configured: %s", quote(name.str), why)
	}
	rule := HeaderRule{Name: name.str, Line: t.line}
	if m, ok := t.keys["mode"]; ok {
		if rule.Mode, ok = parseHeaderMode(m.str); !ok {
			return HeaderRule{}, p.errorAt(m.line, "headers.mode must be one of set, append, remove, got %s", quote(m.str))
		}
	}
	v, hasValue := t.keys["value"]
	if err := p.checkHeaderValue(t, rule, v, hasValue); err != nil {
		return HeaderRule{}, err
	}
	rule.Value = v.str
	return rule, nil
}

// checkHeaderValue checks the value of entry t against its mode: remove
// takes none; set and append need one that Go's HTTP transport will send.
// Messages never show the value, which may hold a token.
func (p *parser) checkHeaderValue(t *table, rule HeaderRule, v entry, hasValue bool) error {
	switch {
	case rule.Mode == HeaderRemove && hasValue:
		return p.errorAt(v.line, "headers.value must be absent when mode is \"remove\" (header %s is deleted, not given a value)", quote(rule.Name))
	case rule.Mode == HeaderRemove:
		return nil
	case !hasValue:
		return p.errorAt(t.line, "header %s has no value, expected value = \"...\" (mode %q needs one)", quote(rule.Name), rule.Mode)
	case v.str == "":
		return p.errorAt(v.line, "headers.value must not be empty for mode %q (use mode = \"remove\" to delete header %s)", rule.Mode, quote(rule.Name))
	case rule.Mode == HeaderAppend && strings.Trim(v.str, " \t,") == "":
		return p.errorAt(v.line, "headers.value must hold at least one token for mode \"append\", got %s", quote(v.str))
	case strings.Trim(v.str, " \t") != v.str:
		// RFC 9110 section 5.5: a field value has no leading or trailing
		// whitespace; the upstream would see a value other than the one written.
		return p.errorAt(v.line, "headers.value must not begin or end with a space or tab (HTTP strips them)")
	}
	for i, r := range v.str {
		if (r < 0x20 && r != '\t') || r == 0x7F {
			return p.errorAt(v.line, "headers.value must not contain control characters other than tab, got %q at byte %d", r, i)
		}
	}
	return nil
}

// isToken reports whether s is an HTTP token (RFC 9110 section 5.6.2), the
// syntax of a header name.
func isToken(s string) bool {
	const tchars = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	return s != "" && strings.Trim(s, tchars) == ""
}

// refusedHeader returns why the header lower (a lower-case name) can never
// be configured, or "".
func refusedHeader(lower string) string {
	switch lower {
	case "authorization":
		return "the client's Authorization always passes through untouched, and the proxy holds no credentials"
	case "host":
		return "Host is always the upstream's host"
	case "content-length":
		return "it is set from the request body"
	}
	for _, h := range hopHeaders {
		if strings.EqualFold(h, lower) {
			return "it is a hop-by-hop header, removed before the request is forwarded"
		}
	}
	return ""
}
