// The gRPC half of kiln-loadgen: Open Inference Protocol v2 ModelInfer calls, each connection its own
// HTTP/2 channel (as bench.client.GrpcClient), requests pre-serialized by bench.client.encode_grpc and
// sent as they are, answers read with protowire: no generated code.
package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec sends a serialized message as it is and hands back the reply's bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }

func (rawCodec) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string { return "proto" } // the server sees application/grpc+proto

// grpcConn is one channel and the method it calls.
type grpcConn struct {
	conn   *grpc.ClientConn
	method string
}

func dialGrpc(spec *Spec) (*grpcConn, error) {
	conn, err := grpc.NewClient(spec.Address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20)),
	)
	if err != nil {
		return nil, err
	}
	return &grpcConn{conn: conn, method: spec.Path}, nil
}

// infer makes one call: the serialized ModelInferResponse, or the call's error.
func (g *grpcConn) infer(request []byte) ([]byte, error) {
	var reply []byte
	err := g.conn.Invoke(context.Background(), g.method, &request, &reply, grpc.ForceCodec(rawCodec{}))
	return reply, err
}

// grpcFirstOutput reads a ModelInferResponse's first output (FP32, raw_output_contents) as float64s.
func grpcFirstOutput(reply []byte) ([]float64, error) {
	datatype, raw, found := "", []byte(nil), false
	for b := reply; len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		value, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == 5 && datatype == "": // outputs: the first one's datatype (field 2)
			datatype = outputDatatype(value)
		case num == 6 && !found: // raw_output_contents
			raw, found = value, true
		}
	}
	if !found {
		return nil, fmt.Errorf("no raw_output_contents")
	}
	if datatype != "FP32" {
		return nil, fmt.Errorf("output of %q: only FP32 is checked", datatype)
	}
	out := make([]float64, len(raw)/4)
	for i := range out {
		out[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
	}
	return out, nil
}

func outputDatatype(tensor []byte) string {
	for b := tensor; len(b) > 0; {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return ""
		}
		if num == 2 && typ == protowire.BytesType {
			value, _ := protowire.ConsumeBytes(b)
			return string(value)
		}
		b = b[n:]
	}
	return ""
}
