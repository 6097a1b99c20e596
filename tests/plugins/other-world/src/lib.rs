//! A well-formed component for some other world, so the tests can check that
//! the host refuses it with a message naming the world it expected.

#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    inline: "
        package example:greeter@1.0.0;
        interface greet { greet: func(name: string) -> string; }
        world greeter { export greet; }
    ",
    world: "greeter",
});

struct Greeter;

impl exports::example::greeter::greet::Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Greeter);
