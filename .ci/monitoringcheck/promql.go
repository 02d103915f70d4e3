package main

import (
	"fmt"
	"slices"
	"strings"
)

// PromQL words that are never metric names. Functions need no list: a name
// followed by "(" is a call. Aggregations may be followed by by/without
// before their "(", so they are listed.
var (
	groupingWords    = []string{"by", "without", "on", "ignoring", "group_left", "group_right"}
	operatorWords    = []string{"and", "or", "unless", "atan2", "bool", "offset"}
	aggregationWords = []string{
		"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
		"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
	}
	numberWords = []string{"inf", "nan"}
)

// metricNames returns the metric names that the vector selectors of expr
// name, in order of first appearance. It is a lexer, not a parser: expr must
// already be valid PromQL (promtool checks that). A selector without a
// metric name ({__name__=~"..."} or {job="x"}) is an error, as its metrics
// could not be checked.
func metricNames(expr string) ([]string, error) {
	var names []string
	i := 0
	n := len(expr)
	for i < n {
		c := expr[i]
		switch {
		case c == '#': // comment to the end of the line
			for i < n && expr[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			j, err := skipString(expr, i)
			if err != nil {
				return nil, err
			}
			i = j
		case c == '{':
			return nil, fmt.Errorf("a selector without a metric name at offset %d: %q", i, tail(expr, i))
		case c == '[':
			j, err := skipBalanced(expr, i, '[', ']')
			if err != nil {
				return nil, err
			}
			i = j
		case isDigit(c) || (c == '.' && i+1 < n && isDigit(expr[i+1])):
			// A number or a duration: 0.9, 1e3, 0x1f, 5m, 1h30m.
			for i < n && (isIdentChar(expr[i]) || expr[i] == '.' ||
				((expr[i] == '+' || expr[i] == '-') && (expr[i-1] == 'e' || expr[i-1] == 'E'))) {
				i++
			}
		case isIdentStart(c):
			j := i
			for j < n && isIdentChar(expr[j]) {
				j++
			}
			word := expr[i:j]
			k := j
			for k < n && isSpace(expr[k]) {
				k++
			}
			next := byte(0)
			if k < n {
				next = expr[k]
			}
			i = j
			lower := strings.ToLower(word)
			switch {
			case slices.Contains(groupingWords, lower):
				if next == '(' {
					end, err := skipBalanced(expr, k, '(', ')')
					if err != nil {
						return nil, err
					}
					i = end
				}
			case slices.Contains(operatorWords, lower), slices.Contains(numberWords, lower):
			case next == '(': // a function or aggregation call
			case slices.Contains(aggregationWords, lower):
			default:
				if !slices.Contains(names, word) {
					names = append(names, word)
				}
				if next == '{' { // its label matchers
					end, err := skipBalanced(expr, k, '{', '}')
					if err != nil {
						return nil, err
					}
					i = end
				}
			}
		default:
			i++
		}
	}
	return names, nil
}

// skipString returns the offset after the string literal that starts at i.
func skipString(s string, i int) (int, error) {
	q := s[i]
	for j := i + 1; j < len(s); j++ {
		switch {
		case s[j] == '\\' && q != '`':
			j++
		case s[j] == q:
			return j + 1, nil
		}
	}
	return 0, fmt.Errorf("unterminated string at offset %d", i)
}

// skipBalanced returns the offset after the close that matches the open at
// i, skipping string literals.
func skipBalanced(s string, i int, open, close byte) (int, error) {
	depth := 0
	for j := i; j < len(s); j++ {
		switch s[j] {
		case '"', '\'', '`':
			end, err := skipString(s, j)
			if err != nil {
				return 0, err
			}
			j = end - 1
		case open:
			depth++
		case close:
			depth--
			if depth == 0 {
				return j + 1, nil
			}
		}
	}
	return 0, fmt.Errorf("no %q to close the %q at offset %d", close, open, i)
}

func tail(s string, i int) string {
	if len(s)-i > 40 {
		return s[i:i+40] + "..."
	}
	return s[i:]
}

func isDigit(c byte) bool      { return c >= '0' && c <= '9' }
func isIdentStart(c byte) bool { return c == '_' || c == ':' || (c|0x20 >= 'a' && c|0x20 <= 'z') }
func isIdentChar(c byte) bool  { return isIdentStart(c) || isDigit(c) }
func isSpace(c byte) bool      { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }
