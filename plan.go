package main

import (
	"bytes"
	"cmp"
	"compress/gzip"
	"errors"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// plan is the Claude plan usage of SPEC.md: the rate-limit state every
// response reports in its headers, per organization, and the tokens every
// successful Messages response cost. Its values come from outside, so every
// label set is bounded: a value that is not [A-Za-z0-9._-]{1,64}, or one
// past its set's bound, is "other".
//
// It is updated once per response (headers) and once per Messages response
// (tokens), under one mutex: a few map operations, cheap next to a request.
type plan struct {
	mu        sync.Mutex
	orgs      labelSet
	windows   labelSet
	resources labelSet
	models    labelSet
	claims    labelSet
	unified   map[orgLabel]*windowState           // by organization and window
	limits    map[orgLabel]*limitState            // by organization and resource
	status    map[string]*orgStatus               // by organization
	tokens    map[orgLabel]*[numTokenTypes]uint64 // by organization and model

	// The keys of the maps above in exposition order, kept sorted as keys
	// are added (rarely), so that a scrape allocates nothing.
	unifiedKeys []orgLabel
	limitKeys   []orgLabel
	statusKeys  []string
	tokenKeys   []orgLabel

	parseErrors atomic.Uint64
	skipped     [numSkipReasons]atomic.Uint64
}

// Bounds on the label values of plan metrics (SPEC: Claude plan usage).
const (
	maxOrgs      = 16
	maxWindows   = 16
	maxResources = 16
	maxModels    = 64
	maxClaims    = 16 // representative claims name windows: as many
)

// skipReason labels anthropic_usage_skipped_total: why a Messages
// response's tokens were not read.
type skipReason int

const (
	skipEncoding   skipReason = iota // a Content-Encoding other than gzip
	numSkipReasons                   // keep last
)

var skipReasonLabels = [numSkipReasons]string{"encoding"}

// tokenTypeOrder is the token types in label order.
var tokenTypeOrder = func() (order [numTokenTypes]tokenType) {
	for t := range order {
		order[t] = tokenType(t)
	}
	slices.SortFunc(order[:], func(a, b tokenType) int { return strings.Compare(tokenTypeLabels[a], tokenTypeLabels[b]) })
	return order
}()

// unifiedStatuses are the values of anthropic-ratelimit-unified-status, in
// exposition order.
var unifiedStatuses = [...]string{"allowed", "allowed_warning", "rejected"}

// orgLabel keys a series by organization and one more label: a window,
// a resource, a model.
type orgLabel struct{ org, name string }

func (a orgLabel) compare(b orgLabel) int {
	return cmp.Or(strings.Compare(a.org, b.org), strings.Compare(a.name, b.name))
}

// insertSorted adds k to the sorted keys.
func insertSorted[K any](keys []K, k K, compare func(K, K) int) []K {
	i, _ := slices.BinarySearchFunc(keys, k, compare)
	return slices.Insert(keys, i, k)
}

type windowState struct {
	utilization float64
	reset       int64
	hasUtil     bool
	hasReset    bool
}

type limitState struct {
	limit, remaining       int64
	hasLimit, hasRemaining bool
}

type orgStatus struct {
	status     int // index in unifiedStatuses; -1 before the first
	statusSeen [len(unifiedStatuses)]bool
	claim      string   // the current representative claim; "" before the first
	claimsSeen []string // every claim seen, sorted; at most maxClaims+1
}

func newPlan() *plan {
	return &plan{
		orgs:      labelSet{max: maxOrgs},
		windows:   labelSet{max: maxWindows},
		resources: labelSet{max: maxResources},
		models:    labelSet{max: maxModels},
		claims:    labelSet{max: maxClaims},
		unified:   make(map[orgLabel]*windowState),
		limits:    make(map[orgLabel]*limitState),
		status:    make(map[string]*orgStatus),
		tokens:    make(map[orgLabel]*[numTokenTypes]uint64),
	}
}

// labelSet interns label values, at most max distinct ones; any other value
// is "other". Its user holds plan.mu.
type labelSet struct {
	max  int
	vals map[string]string
}

// otherLabel stands for every label value refused or past a bound.
const otherLabel = "other"

// intern returns the label for v. b holds v's bytes, so that a value seen
// before costs no allocation.
func (ls *labelSet) intern(b []byte) string {
	if v, ok := ls.vals[string(b)]; ok {
		return v
	}
	if !validLabel(b) || len(ls.vals) >= ls.max {
		return otherLabel
	}
	if ls.vals == nil {
		ls.vals = make(map[string]string)
	}
	v := string(b)
	ls.vals[v] = v
	return v
}

// label returns the label for v; "" stays "" (no organization header).
func (ls *labelSet) label(v string) string {
	var buf [64]byte
	switch {
	case v == "":
		return ""
	case len(v) > len(buf):
		return otherLabel
	}
	return ls.intern(append(buf[:0], v...))
}

// validLabel reports whether b matches [A-Za-z0-9._-]{1,64}.
func validLabel(b []byte) bool {
	if len(b) == 0 || len(b) > 64 {
		return false
	}
	for _, c := range b {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// The rate-limit headers' names, matched without regard to case: net/http
// hands them over in canonical form
// ("Anthropic-Ratelimit-Unified-5h-Utilization").
const (
	rateLimitPrefix = "anthropic-ratelimit-"
	unifiedPrefix   = "unified-"
	organizationKey = "Anthropic-Organization-Id"
)

// rateLimitHeader is one anthropic-ratelimit-* header, parsed from its name.
type rateLimitHeader struct {
	value string
	kind  headerKind
	name  []byte // the window or resource, lower-case
}

// headerKind is what a rate-limit header reports.
type headerKind uint8

const (
	headerUtilization headerKind = iota
	headerReset
	headerStatus
	headerClaim
	headerLimit
	headerRemaining
)

// rateLimits records the anthropic-ratelimit-* headers of a response. It
// reads nothing but the header map and never fails the response: a
// malformed value is counted in anthropic_usage_parse_errors_total and the
// gauge keeps its previous value.
func (p *plan) rateLimits(h http.Header) {
	// The API sends about a dozen; past 24 (in the map's random order)
	// the rest of a response's rate-limit headers are not read.
	var found [24]rateLimitHeader
	n := 0
	var names [len(found)][64]byte
	for k, vv := range h {
		if len(vv) == 0 || len(k) <= len(rateLimitPrefix) || !strings.EqualFold(k[:len(rateLimitPrefix)], rateLimitPrefix) || n == len(found) {
			continue
		}
		kind, name, ok := rateLimitKind(k[len(rateLimitPrefix):])
		if !ok {
			continue
		}
		f := rateLimitHeader{value: vv[0], kind: kind} // a name too long for a label stays nil: "other"
		if len(name) <= len(names[n]) {
			f.name = lower(names[n][:0], name)
		}
		found[n] = f
		n++
	}
	if n == 0 {
		return
	}
	errs := 0
	p.mu.Lock()
	defer p.mu.Unlock()
	org := p.orgs.label(h.Get(organizationKey))
	for _, f := range found[:n] {
		if !p.record(org, f) {
			errs++
		}
	}
	p.parseErrors.Add(uint64(errs))
}

// rateLimitKind splits the rest of a header name after "anthropic-ratelimit-"
// into its kind and the window or resource it names.
func rateLimitKind(rest string) (kind headerKind, name string, ok bool) {
	cut := func(suffix string) (string, bool) {
		if len(rest) > len(suffix) && strings.EqualFold(rest[len(rest)-len(suffix):], suffix) {
			return rest[:len(rest)-len(suffix)], true
		}
		return "", false
	}
	if len(rest) > len(unifiedPrefix) && strings.EqualFold(rest[:len(unifiedPrefix)], unifiedPrefix) {
		switch u := rest[len(unifiedPrefix):]; {
		case strings.EqualFold(u, "status"):
			return headerStatus, "", true
		case strings.EqualFold(u, "representative-claim"):
			return headerClaim, "", true
		}
		if w, ok := cut("-utilization"); ok && len(w) > len(unifiedPrefix) {
			return headerUtilization, w[len(unifiedPrefix):], true
		}
		if w, ok := cut("-reset"); ok && len(w) > len(unifiedPrefix) {
			return headerReset, w[len(unifiedPrefix):], true
		}
		return 0, "", false
	}
	if r, ok := cut("-limit"); ok {
		return headerLimit, r, true
	}
	if r, ok := cut("-remaining"); ok {
		return headerRemaining, r, true
	}
	return 0, "", false
}

// lower appends s to b in lower case.
func lower(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		b = append(b, c)
	}
	return b
}

// record sets the gauge one header reports, and reports whether its value
// was well formed. p.mu is held.
func (p *plan) record(org string, f rateLimitHeader) bool {
	switch f.kind {
	case headerUtilization, headerReset:
		key := orgLabel{org, p.windows.intern(f.name)}
		w := p.unified[key]
		if w == nil {
			w = new(windowState)
			p.unified[key] = w
			p.unifiedKeys = insertSorted(p.unifiedKeys, key, orgLabel.compare)
		}
		if f.kind == headerUtilization {
			v, ok := parseFraction(f.value)
			if ok {
				w.utilization, w.hasUtil = v, true
			}
			return ok
		}
		v, ok := parseDigits(f.value)
		if ok {
			w.reset, w.hasReset = v, true
		}
		return ok
	case headerLimit, headerRemaining:
		key := orgLabel{org, p.resources.intern(f.name)}
		l := p.limits[key]
		if l == nil {
			l = new(limitState)
			p.limits[key] = l
			p.limitKeys = insertSorted(p.limitKeys, key, orgLabel.compare)
		}
		v, ok := parseDigits(f.value)
		if ok && f.kind == headerLimit {
			l.limit, l.hasLimit = v, true
		} else if ok {
			l.remaining, l.hasRemaining = v, true
		}
		return ok
	case headerStatus, headerClaim:
		st := p.status[org]
		if st == nil {
			st = &orgStatus{status: -1}
			p.status[org] = st
			p.statusKeys = insertSorted(p.statusKeys, org, strings.Compare)
		}
		if f.kind == headerStatus {
			// A status SPEC does not list is malformed, and the last
			// known one stays current.
			i := slices.Index(unifiedStatuses[:], f.value)
			if i < 0 {
				return false
			}
			st.status, st.statusSeen[i] = i, true
			return true
		}
		if f.value == "" {
			return false
		}
		claim := p.claims.label(f.value)
		st.claim = claim
		if _, seen := slices.BinarySearch(st.claimsSeen, claim); !seen {
			st.claimsSeen = insertSorted(st.claimsSeen, claim, strings.Compare)
		}
		return true
	}
	return false
}

// parseFraction parses a utilization: a finite decimal number ≥ 0 (above 1
// is legal: a window can be overdrawn).
func parseFraction(s string) (float64, bool) {
	if s == "" || strings.TrimLeft(s, "0123456789.eE+-") != "" {
		return 0, false // no "inf", "nan", hex or underscores
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, false
	}
	return v, true
}

// addTokens counts a Messages response's tokens, those of the types known.
func (p *plan) addTokens(org, model string, tokens [numTokenTypes]int64, known [numTokenTypes]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := orgLabel{p.orgs.label(org), otherLabel}
	if model != "" { // only an organization may be empty
		key.name = p.models.label(model)
	}
	counts := p.tokens[key]
	if counts == nil {
		counts = new([numTokenTypes]uint64)
		p.tokens[key] = counts
		p.tokenKeys = insertSorted(p.tokenKeys, key, orgLabel.compare)
	}
	for t, ok := range known {
		if ok {
			counts[t] += uint64(tokens[t])
		}
	}
}

// Plan metric family names and help texts, in exposition (name) order.
const (
	limitName       = "anthropic_ratelimit_limit"
	limitHelp       = "The API's rate limit of a resource (API-key style anthropic-ratelimit-<resource>-limit headers)."
	remainingName   = "anthropic_ratelimit_remaining"
	remainingHelp   = "What is left of a resource's rate limit (anthropic-ratelimit-<resource>-remaining)."
	claimName       = "anthropic_ratelimit_unified_representative_claim"
	claimHelp       = "1 for the window that limits the organization now (anthropic-ratelimit-unified-representative-claim), 0 for the others seen."
	resetName       = "anthropic_ratelimit_unified_reset_timestamp_seconds"
	resetHelp       = "When a plan window resets, in Unix seconds (anthropic-ratelimit-unified-<window>-reset)."
	statusName      = "anthropic_ratelimit_unified_status"
	statusHelp      = "1 for the organization's current plan status (allowed, allowed_warning, rejected), 0 for the others seen."
	utilizationName = "anthropic_ratelimit_unified_utilization"
	utilizationHelp = "Share of a plan window used, 1 being the whole (anthropic-ratelimit-unified-<window>-utilization); may exceed 1."
	tokensName      = "anthropic_tokens_total"
	tokensHelp      = "Tokens of successful Messages responses, by organization, the model that answered, and type (input, output, cache_read, cache_creation)."
	parseErrName    = "anthropic_usage_parse_errors_total"
	parseErrHelp    = "Rate-limit header values and token counts ignored because they were malformed."
	skippedName     = "anthropic_usage_skipped_total"
	skippedHelp     = "Successful Messages responses whose tokens were not read, by reason (encoding: neither identity nor gzip)."
)

// writePrometheus appends the plan's families, sorted by name, series
// sorted by their labels. It allocates nothing.
func (p *plan) writePrometheus(b *bytes.Buffer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	writeOrgGauges(b, limitName, limitHelp, "resource", p.limitKeys, func(k orgLabel) (float64, bool) {
		l := p.limits[k]
		return float64(l.limit), l.hasLimit
	})
	writeOrgGauges(b, remainingName, remainingHelp, "resource", p.limitKeys, func(k orgLabel) (float64, bool) {
		l := p.limits[k]
		return float64(l.remaining), l.hasRemaining
	})
	writeFamilyHeader(b, claimName, claimHelp, "gauge")
	for _, org := range p.statusKeys {
		st := p.status[org]
		for _, c := range st.claimsSeen {
			writePlanSample(b, claimName, "claim", orgLabel{org, c}, oneIf(c == st.claim))
		}
	}
	writeOrgGauges(b, resetName, resetHelp, "window", p.unifiedKeys, func(k orgLabel) (float64, bool) {
		w := p.unified[k]
		return float64(w.reset), w.hasReset
	})
	writeFamilyHeader(b, statusName, statusHelp, "gauge")
	for _, org := range p.statusKeys {
		st := p.status[org]
		for i, seen := range st.statusSeen {
			if seen {
				writePlanSample(b, statusName, "status", orgLabel{org, unifiedStatuses[i]}, oneIf(i == st.status))
			}
		}
	}
	writeOrgGauges(b, utilizationName, utilizationHelp, "window", p.unifiedKeys, func(k orgLabel) (float64, bool) {
		w := p.unified[k]
		return w.utilization, w.hasUtil
	})

	writeFamilyHeader(b, tokensName, tokensHelp, "counter")
	for _, k := range p.tokenKeys {
		counts := p.tokens[k]
		for _, t := range tokenTypeOrder {
			b.WriteString(tokensName)
			writeLabel(b, '{', "organization", k.org)
			writeLabel(b, ',', "model", k.name)
			writeLabel(b, ',', "type", tokenTypeLabels[t])
			b.WriteString("} ")
			writeUint(b, counts[t])
		}
	}

	writeFamilyHeader(b, parseErrName, parseErrHelp, "counter")
	writeSample(b, parseErrName, "", "", int64(p.parseErrors.Load()))
	writeFamilyHeader(b, skippedName, skippedHelp, "counter")
	for r := range p.skipped {
		writeSample(b, skippedName, "reason", skipReasonLabels[r], int64(p.skipped[r].Load()))
	}
}

// writeOrgGauges appends a gauge family whose series are keyed by
// organization and a name (label), in the order of keys, each with the
// value value gives, if it gives one.
func writeOrgGauges(b *bytes.Buffer, name, help, label string, keys []orgLabel, value func(orgLabel) (float64, bool)) {
	writeFamilyHeader(b, name, help, "gauge")
	for _, k := range keys {
		if v, ok := value(k); ok {
			writePlanSample(b, name, label, k, v)
		}
	}
}

// writePlanSample appends the line name{organization="…",label="…"} v.
// Integers up to 2^53 (Unix times, limits) print as integers.
func writePlanSample(b *bytes.Buffer, name, label string, k orgLabel, v float64) {
	b.WriteString(name)
	writeLabel(b, '{', "organization", k.org)
	writeLabel(b, ',', label, k.name)
	b.WriteString("} ")
	if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
		b.Write(strconv.AppendInt(b.AvailableBuffer(), int64(v), 10))
	} else {
		b.Write(strconv.AppendFloat(b.AvailableBuffer(), v, 'g', -1, 64))
	}
	b.WriteByte('\n')
}

func oneIf(c bool) float64 {
	if c {
		return 1
	}
	return 0
}

// usageReading reads the tokens of one successful Messages response from
// the bytes responseBody passes on to the client: as they are, or through a
// decompressing copy for a gzip body. It never changes, holds or delays
// those bytes beyond the scan itself.
type usageReading struct {
	scan    usageScanner
	gz      *gunzip      // nil for an identity body
	zr      *gzip.Reader // kept for the next gzip body
	copyBuf []byte
}

// startUsage returns the reading of res's tokens, or nil when there are
// none to read: only a 2xx answer to a Messages request, with an event
// stream or a JSON body, has them. A body in an encoding other than gzip
// is counted as skipped.
func (p *plan) startUsage(res *http.Response) *usageReading {
	if res.StatusCode < 200 || res.StatusCode > 299 {
		return nil
	}
	ct := res.Header.Get("Content-Type")
	stream := strings.HasPrefix(ct, "text/event-stream")
	if !stream && !strings.HasPrefix(ct, "application/json") {
		return nil
	}
	var gz bool
	switch enc := res.Header.Get("Content-Encoding"); {
	case enc == "" || strings.EqualFold(enc, "identity"):
	case strings.EqualFold(enc, "gzip"):
		gz = true
	default:
		p.skipped[skipEncoding].Add(1)
		return nil
	}
	u := usageReadings.Get().(*usageReading)
	u.scan.init(stream)
	u.gz = nil
	if gz {
		u.gz = u.startGunzip()
	}
	return u
}

// usageReadings holds readings for reuse: each holds a few KiB of room for
// the values it captures, which a busy proxy would otherwise allocate for
// every Messages response.
var usageReadings = sync.Pool{New: func() any { return new(usageReading) }}

// write feeds the next bytes of the body, as received.
func (u *usageReading) write(p []byte) {
	if u.gz != nil {
		u.gz.write(p)
		return
	}
	u.scan.write(p)
}

// end counts what was read, also of a body cut short: the API bills the
// input of a stream the client left. It returns the model and counts for
// the request's log line, and u to the pool: u is not used after.
func (u *usageReading) end(p *plan, org string) (model string, tokens [numTokenTypes]int64, known [numTokenTypes]bool) {
	if u.gz != nil {
		u.gz.close()
	}
	model, tokens, known, errs := u.scan.result()
	p.parseErrors.Add(uint64(errs))
	if model != "" || slices.Contains(known[:], true) {
		p.addTokens(org, model, tokens, known)
	}
	u.gz = nil
	usageReadings.Put(u)
	return model, tokens, known
}

// gunzip decompresses a gzip body into w on a goroutine of its own, fed
// through a pipe: write returns once the decompressor has taken the bytes,
// and close once all of them are scanned. A body that is not valid gzip,
// or a scanner that panics, stops the reading, never the response. The
// decompressor (its 32 KiB window) and the copy buffer are u's, pooled
// with it.
type gunzip struct {
	pw     *io.PipeWriter
	done   chan struct{}
	failed bool
}

// errScanPanic ends the reading of a gzip body whose scan panicked.
var errScanPanic = errors.New("usage scan panicked")

func (u *usageReading) startGunzip() *gunzip {
	pr, pw := io.Pipe()
	g := &gunzip{pw: pw, done: make(chan struct{})}
	if u.copyBuf == nil {
		u.copyBuf = make([]byte, 4<<10)
	}
	go func() {
		defer close(g.done)
		defer func() {
			if recover() != nil {
				pr.CloseWithError(errScanPanic)
			}
		}()
		var err error
		if u.zr == nil {
			u.zr, err = gzip.NewReader(pr)
		} else {
			err = u.zr.Reset(pr)
		}
		if err == nil {
			_, err = io.CopyBuffer(feed(u.scan.write), u.zr, u.copyBuf)
		}
		// Writes after a failure return at once instead of blocking.
		pr.CloseWithError(cmp.Or(err, io.EOF))
	}()
	return g
}

// feed makes a scanner's write an io.Writer.
type feed func([]byte)

func (f feed) Write(p []byte) (int, error) { f(p); return len(p), nil }

func (g *gunzip) write(p []byte) {
	if !g.failed {
		_, err := g.pw.Write(p)
		g.failed = err != nil
	}
}

// close ends the body and waits for the last bytes to be scanned.
func (g *gunzip) close() {
	g.pw.Close()
	<-g.done
}
