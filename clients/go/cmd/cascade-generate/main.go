// Command cascade-generate streams one Generate call through a cascade-scheduler, using only
// code generated from proto/cascadeinfer/v1/scheduler.proto.
//
// Standard output is JSON lines: one per message that carries output, as it arrives
// ({"request_id", "first_index", "token_ids", "text"}), then one summary line
// ({"request_id", "finish_reason", "num_tokens", "timings"}).
//
// Exit status: 0 on success; the gRPC status code (1-16) when the call fails, with
// "cascade-generate: CODE: message" on standard error; 64 for bad flags; 65 when the stream
// ended without a finish reason.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/cascadeinfer/cascadeinfer/clients/go/gen/cascadeinfer/v1"
)

const (
	exitUsage      = 64 // EX_USAGE
	exitNoFinish   = 65 // EX_DATAERR
	finishPrefix   = "FINISH_REASON_"
	defaultTimeout = 60 * time.Second
)

type options struct {
	address   string
	tokenIDs  string
	text      string
	maxTokens uint
	requestID string
	ignoreEOS bool
	timeout   time.Duration
}

type batch struct {
	RequestID  string   `json:"request_id"`
	FirstIndex uint32   `json:"first_index"`
	TokenIDs   []uint32 `json:"token_ids"`
	Text       string   `json:"text,omitempty"`
}

type timings struct {
	QueueS        float64 `json:"queue_s"`
	TTFTS         float64 `json:"ttft_s"`
	TPOTS         float64 `json:"tpot_s"`
	TotalS        float64 `json:"total_s"`
	NumMigrations uint32  `json:"num_migrations"`
}

type summary struct {
	RequestID    string  `json:"request_id"`
	FinishReason string  `json:"finish_reason"`
	NumTokens    int     `json:"num_tokens"`
	Timings      timings `json:"timings"`
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cascade-generate: %v\n", err)
		os.Exit(exitUsage)
	}
	request, err := buildRequest(opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cascade-generate: %v\n", err)
		os.Exit(exitUsage)
	}
	os.Exit(run(opts, request))
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("cascade-generate", flag.ContinueOnError)
	fs.StringVar(&o.address, "address", "", "scheduler address HOST:PORT (required)")
	fs.StringVar(&o.tokenIDs, "prompt-token-ids", "", "comma-separated prompt token ids, e.g. 1,2,3")
	fs.StringVar(&o.text, "text", "", "a text prompt (needs a tokenizer on the scheduler)")
	fs.UintVar(&o.maxTokens, "max-tokens", 16, "most output tokens to generate")
	fs.StringVar(&o.requestID, "request-id", "", "request id (the scheduler makes one when empty)")
	fs.BoolVar(&o.ignoreEOS, "ignore-eos", true, "keep generating past the end-of-sequence token")
	fs.DurationVar(&o.timeout, "timeout", defaultTimeout, "deadline of the whole call")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if o.address == "" {
		return o, errors.New("--address is required")
	}
	if (o.tokenIDs == "") == (o.text == "") {
		return o, errors.New("give exactly one of --prompt-token-ids and --text")
	}
	if o.maxTokens > 1<<32-1 {
		return o, fmt.Errorf("--max-tokens %d: too large", o.maxTokens)
	}
	return o, nil
}

// buildRequest leaves the checks of values (empty prompt, max_tokens < 1) to the scheduler, so
// its INVALID_ARGUMENT answers reach the caller unchanged.
func buildRequest(o options) (*pb.ClientGenerateRequest, error) {
	request := &pb.ClientGenerateRequest{
		RequestId: o.requestID,
		Sampling:  &pb.SamplingParams{MaxTokens: uint32(o.maxTokens), IgnoreEos: o.ignoreEOS},
	}
	if o.text != "" {
		request.Prompt = &pb.ClientGenerateRequest_Text{Text: o.text}
		return request, nil
	}
	ids := []uint32{}
	for _, field := range strings.Split(o.tokenIDs, ",") {
		field = strings.TrimSpace(field)
		if field == "" {
			continue
		}
		id, err := strconv.ParseUint(field, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("--prompt-token-ids: %q is not a token id", field)
		}
		ids = append(ids, uint32(id))
	}
	request.Prompt = &pb.ClientGenerateRequest_PromptTokenIds{
		PromptTokenIds: &pb.TokenIds{Ids: ids},
	}
	return request, nil
}

func run(o options, request *pb.ClientGenerateRequest) int {
	conn, err := grpc.NewClient(o.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	stream, err := pb.NewSchedulerServiceClient(conn).Generate(ctx, request)
	if err != nil {
		return fail(err)
	}
	out := json.NewEncoder(os.Stdout)
	var last *pb.ClientGenerateResponse
	numTokens := 0
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fail(err)
		}
		ids := r.GetTokens().GetTokenIds()
		if len(ids) > 0 || r.GetText() != "" {
			if ids == nil {
				ids = []uint32{}
			}
			_ = out.Encode(batch{r.GetRequestId(), r.GetTokens().GetFirstIndex(), ids, r.GetText()})
		}
		numTokens += len(ids)
		last = r
	}
	if last == nil || last.GetFinishReason() == pb.FinishReason_FINISH_REASON_UNSPECIFIED {
		fmt.Fprintln(os.Stderr, "cascade-generate: the stream ended without a finish reason")
		return exitNoFinish
	}
	t := last.GetTimings()
	_ = out.Encode(summary{
		RequestID:    last.GetRequestId(),
		FinishReason: strings.ToLower(strings.TrimPrefix(last.GetFinishReason().String(), finishPrefix)),
		NumTokens:    numTokens,
		Timings: timings{
			t.GetQueueS(), t.GetTtftS(), t.GetTpotS(), t.GetTotalS(), t.GetNumMigrations(),
		},
	})
	return 0
}

// fail reports a failed call and returns its gRPC status code as the exit status.
func fail(err error) int {
	s := status.Convert(err)
	fmt.Fprintf(os.Stderr, "cascade-generate: %s: %s\n", codeName(s.Code()), s.Message())
	if s.Code() == codes.OK {
		return int(codes.Unknown)
	}
	return int(s.Code())
}

// codeName is the canonical upper-case name (INVALID_ARGUMENT), as other gRPC tools print it.
func codeName(c codes.Code) string {
	if c == codes.OK {
		return "OK"
	}
	var b strings.Builder
	for i, r := range c.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}
