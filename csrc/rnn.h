// A one-layer LSTM over time on the CPU, with the state reset at episode starts: the sequence pass of
// a recurrent PPO policy's update (and its rollout step, T = 1) in one call each way, no Python loop
// over time. Gates in torch.nn.LSTM's order and layout (i, f, g, o; weight_ih [4H, F], weight_hh
// [4H, H], biases [4H]), so the parameters are read in place from an nn.LSTM.
//
// Step t of environment e: (h, c) of the step before (h0, c0 at t = 0; zeros where starts[t, e]),
//   z = W_ih x + b_ih + W_hh h + b_hh,  i, f, o = sigmoid(z_i, z_f, z_o),  g = tanh(z_g),
//   c' = f c + i g,  h' = o tanh(c').
#pragma once

#include <cstdint>

namespace fastppo {

// Rows are time-major: row t * n + e. Every array is contiguous unless a stride is given.
struct LstmArgs {
  bool is_f64 = false;
  int64_t T = 0, n = 0, F = 0, H = 0;
  const void* x = nullptr;  // [T * n, F], row stride ldx
  int64_t ldx = 0;
  const uint8_t* starts = nullptr;  // [T * n] (1: reset before the step), or null: none
  const void* h0 = nullptr;         // [n, H], or null: zeros
  const void* c0 = nullptr;         // [n, H], or null: zeros
  const void* w_ih = nullptr;       // [4H, F]
  const void* w_hh = nullptr;       // [4H, H]
  const void* b_ih = nullptr;       // [4H], or null
  const void* b_hh = nullptr;       // [4H], or null
  // W_ih^T [F, 4H] and W_hh^T [H, 4H] when the caller keeps them (forward only), else null: the
  // forward transposes the weights into its scratch.
  const void* w_ih_t = nullptr;
  const void* w_hh_t = nullptr;
  void* out = nullptr;              // [T * n, H]: h after each step
  void* h_n = nullptr;              // [n, H]: h after the last step (or null)
  void* c_n = nullptr;              // [n, H]: c after the last step (or null)
  // What the backward reads, written by the forward when not null: lstm_saved_size(T * n, H) elements,
  // the activated gates [rows, 4H], the state each step started from (h, c: [rows, H] each) and tanh(c')
  // [rows, H].
  void* saved = nullptr;
  // Backward: the gradients of out (and of h_n, c_n: null for none) in, the others out (null: not needed).
  const void* grad_out = nullptr;
  const void* grad_h_n = nullptr;
  const void* grad_c_n = nullptr;
  void* grad_x = nullptr;     // [T * n, F], contiguous
  void* grad_h0 = nullptr;    // [n, H]
  void* grad_c0 = nullptr;    // [n, H]
  void* grad_w_ih = nullptr;  // [4H, F]
  void* grad_w_hh = nullptr;  // [4H, H]
  void* grad_b_ih = nullptr;  // [4H]
  void* grad_b_hh = nullptr;  // [4H]
};

inline int64_t lstm_saved_size(int64_t rows, int64_t H) { return rows * 7 * H; }

void lstm_forward_cpu(const LstmArgs& args);
// Needs the forward's `saved`; writes (not accumulates) every gradient asked for.
void lstm_backward_cpu(const LstmArgs& args);

}  // namespace fastppo
