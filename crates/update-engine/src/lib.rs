// SPDX-License-Identifier: Apache-2.0
//! Client for Flatcar update_engine (com.coreos.update1) over D-Bus.
