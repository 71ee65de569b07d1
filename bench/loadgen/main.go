// kiln-loadgen: the serving benchmark's client in Go, for hosts where a Python client would take
// the CPU the server needs (bench/serving.py --client go; docs/benchmarks.md §13 and §15).
//
// Each connection sends batch-1 Open Inference Protocol requests with binary tensors over one keep-alive
// TCP connection (TCP_NODELAY, Go's default), one request at a time, cycling through the variants from
// its own offset, and checks the first output of every answer against eager PyTorch's, within the
// tolerance bench.coldstart.matches uses. HTTP with the standard library; gRPC (protocol "grpc") with
// grpc-go, in grpc.go.
//
//	kiln-loadgen < spec.json > result.json
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Variant is one request body, its headers and the expected first output (float32 values, row-major).
type Variant struct {
	Body     []byte            `json:"body"` // base64 in JSON
	Headers  map[string]string `json:"headers"`
	Expected []float64         `json:"expected"`
}

type Spec struct {
	Address     string    `json:"address"`  // host:port
	Protocol    string    `json:"protocol"` // "http" when empty, or "grpc"
	Method      string    `json:"method"`   // POST when empty
	Path        string    `json:"path"`     // the route, or the gRPC method's full name
	Concurrency int       `json:"concurrency"`
	Seconds     float64   `json:"seconds"`
	Variants    []Variant `json:"variants"`
}

type Result struct {
	Requests int     `json:"requests"`
	Errors   int     `json:"errors"`
	Wrong    int     `json:"wrong"`
	Elapsed  float64 `json:"elapsed_s"`
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	FirstErr string  `json:"first_error,omitempty"`
}

type answerHeader struct {
	Outputs []struct {
		Datatype   string                 `json:"datatype"`
		Data       []float64              `json:"data"`
		Parameters map[string]json.Number `json:"parameters"`
	} `json:"outputs"`
}

func request(spec *Spec, v Variant) []byte {
	var b strings.Builder
	method := spec.Method
	if method == "" {
		method = "POST"
	}
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, spec.Path, spec.Address)
	if method == "POST" {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(v.Body))
	}
	for k, val := range v.Headers {
		fmt.Fprintf(&b, "%s: %s\r\n", k, val)
	}
	b.WriteString("\r\n")
	return append([]byte(b.String()), v.Body...)
}

// roundTrip sends one request and reads its answer: status, body, the inference header's length (-1: none).
func roundTrip(conn net.Conn, r *bufio.Reader, raw []byte) (int, []byte, int, error) {
	if _, err := conn.Write(raw); err != nil {
		return 0, nil, 0, err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, nil, 0, err
	}
	parts := strings.SplitN(line, " ", 3)
	if len(parts) < 2 {
		return 0, nil, 0, fmt.Errorf("bad status line %q", line)
	}
	status, _ := strconv.Atoi(parts[1])
	length, split := -1, -1
	for {
		h, err := r.ReadString('\n')
		if err != nil {
			return 0, nil, 0, err
		}
		h = strings.TrimRight(h, "\r\n")
		if h == "" {
			break
		}
		name, value, _ := strings.Cut(h, ":")
		switch strings.ToLower(name) {
		case "content-length":
			length, _ = strconv.Atoi(strings.TrimSpace(value))
		case "inference-header-content-length":
			split, _ = strconv.Atoi(strings.TrimSpace(value))
		}
	}
	if length < 0 {
		return 0, nil, 0, fmt.Errorf("answer without Content-Length")
	}
	body := make([]byte, length)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, 0, err
	}
	return status, body, split, nil
}

// firstOutput reads the answer's first output as float64s (FP32 binary or JSON data).
func firstOutput(body []byte, split int) ([]float64, error) {
	if split < 0 {
		split = len(body)
	}
	if split > len(body) {
		return nil, fmt.Errorf("inference header longer than the body")
	}
	var h answerHeader
	if err := json.Unmarshal(body[:split], &h); err != nil {
		return nil, err
	}
	if len(h.Outputs) == 0 {
		return nil, fmt.Errorf("no outputs")
	}
	o := h.Outputs[0]
	if o.Data != nil {
		return o.Data, nil
	}
	if o.Datatype != "FP32" {
		return nil, fmt.Errorf("binary output of %s: only FP32 is checked", o.Datatype)
	}
	size, err := o.Parameters["binary_data_size"].Int64()
	if err != nil || split+int(size) > len(body) {
		return nil, fmt.Errorf("bad binary_data_size")
	}
	raw := body[split : split+int(size)]
	out := make([]float64, len(raw)/4)
	for i := range out {
		out[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
	}
	return out, nil
}

// matches: bench.coldstart.matches, what compiled kernels may differ from eager by.
func matches(got, expected []float64) bool {
	if len(got) != len(expected) {
		return false
	}
	worst, scale := 0.0, 0.0
	for i := range got {
		worst = math.Max(worst, math.Abs(got[i]-expected[i]))
		scale = math.Max(scale, math.Abs(expected[i]))
	}
	return worst <= 1e-3+2e-2*scale
}

// A sender makes variant i's call and returns how to read the answer's first output; i < 0 closes it.
type sender func(i int) (func() ([]float64, error), error)

// httpSender: one keep-alive connection, opened again after an error.
func httpSender(spec *Spec, raws [][]byte) sender {
	var conn net.Conn
	var r *bufio.Reader
	return func(i int) (func() ([]float64, error), error) {
		if i < 0 || conn == nil {
			if i < 0 {
				if conn != nil {
					conn.Close()
				}
				return nil, nil
			}
			var err error
			if conn, err = net.Dial("tcp", spec.Address); err != nil {
				time.Sleep(10 * time.Millisecond)
				return nil, err
			}
			r = bufio.NewReaderSize(conn, 1<<16)
		}
		status, body, split, err := roundTrip(conn, r, raws[i])
		if err != nil || status != 200 {
			if err == nil {
				err = fmt.Errorf("HTTP %d: %.200s", status, body)
			}
			conn.Close()
			conn = nil
			return nil, err
		}
		return func() ([]float64, error) { return firstOutput(body, split) }, nil
	}
}

// grpcSender: one channel of its own, which reconnects by itself.
func grpcSender(spec *Spec) sender {
	g, dialErr := dialGrpc(spec)
	return func(i int) (func() ([]float64, error), error) {
		if dialErr != nil {
			if i >= 0 {
				time.Sleep(10 * time.Millisecond)
			}
			return nil, dialErr
		}
		if i < 0 {
			g.conn.Close()
			return nil, nil
		}
		reply, err := g.infer(spec.Variants[i].Body)
		if err != nil {
			return nil, err
		}
		return func() ([]float64, error) { return grpcFirstOutput(reply) }, nil
	}
}

func main() {
	var spec Spec
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fmt.Fprintln(os.Stderr, "kiln-loadgen: reading the spec:", err)
		os.Exit(2)
	}
	raws := make([][]byte, len(spec.Variants))
	for i, v := range spec.Variants {
		raws[i] = request(&spec, v)
	}
	var (
		mu        sync.Mutex
		latencies []time.Duration
		res       Result
		wg        sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(time.Duration(spec.Seconds * float64(time.Second)))
	for c := 0; c < spec.Concurrency; c++ {
		wg.Add(1)
		go func(first int) {
			defer wg.Done()
			var mine []time.Duration
			errors, wrong, firstErr := 0, 0, ""
			fail := func(err error) {
				errors++
				if firstErr == "" {
					firstErr = err.Error()
				}
			}
			send := httpSender(&spec, raws)
			if spec.Protocol == "grpc" {
				send = grpcSender(&spec)
			}
			for k := first; time.Now().Before(deadline); k++ {
				i := k % len(raws)
				t := time.Now()
				got, err := send(i)
				if err != nil {
					fail(err)
					continue
				}
				mine = append(mine, time.Since(t))
				if expected := spec.Variants[i].Expected; expected != nil {
					first, err := got()
					if err != nil || !matches(first, expected) {
						wrong++ // batching must never hand a request another's answer
					}
				}
			}
			send(-1)
			mu.Lock()
			latencies = append(latencies, mine...)
			res.Errors += errors
			res.Wrong += wrong
			if res.FirstErr == "" {
				res.FirstErr = firstErr
			}
			mu.Unlock()
		}(c)
	}
	wg.Wait()
	res.Elapsed = time.Since(start).Seconds()
	res.Requests = len(latencies)
	if len(latencies) > 0 {
		sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
		pct := func(p float64) float64 {
			return float64(latencies[int(p*float64(len(latencies)-1))].Microseconds()) / 1e3
		}
		res.P50, res.P99 = pct(0.50), pct(0.99)
	}
	json.NewEncoder(os.Stdout).Encode(res)
}
